"""API layer: models of the custom resources and of the compiled gateway config.

Imports nothing else of Portcullis, so every other layer may import it.
"""

from portcullis.api.config import (
    ConnectionConfig,
    ExposedPrompt,
    ExposedResource,
    ExposedResourceTemplate,
    ExposedTool,
    GatewayConfig,
    ServerInfo,
    TokenPolicy,
)
from portcullis.api.resources import (
    API_VERSION,
    GROUP,
    VERSION,
    CredentialSpec,
    MCPConnection,
    MCPConnectionSpec,
    ObjectMeta,
    ResourceTemplateSelector,
    ToolMapping,
    ToolMappingSpec,
    VirtualMCPServer,
    VirtualMCPServerSpec,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ConnectionConfig",
    "CredentialSpec",
    "ExposedPrompt",
    "ExposedResource",
    "ExposedResourceTemplate",
    "ExposedTool",
    "GatewayConfig",
    "MCPConnection",
    "MCPConnectionSpec",
    "ObjectMeta",
    "ResourceTemplateSelector",
    "ServerInfo",
    "TokenPolicy",
    "ToolMapping",
    "ToolMappingSpec",
    "VirtualMCPServer",
    "VirtualMCPServerSpec",
]
