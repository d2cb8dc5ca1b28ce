"""Status vocabulary: condition types and reasons, declared once.

Printer columns, the operator and the tests all read these names from here.
"""

from __future__ import annotations

from enum import StrEnum


class ConditionType(StrEnum):
    READY = "Ready"
    CONFIG_VALID = "ConfigValid"
    ACCEPTED = "Accepted"


class Reason(StrEnum):
    # VirtualMCPServer
    RECONCILED = "Reconciled"
    DEPLOYMENT_PROGRESSING = "DeploymentProgressing"
    DEPLOYMENT_AVAILABLE = "DeploymentAvailable"
    COMPILED = "Compiled"
    INVALID_SPEC = "InvalidSpec"
    SOME_MAPPINGS_REJECTED = "SomeMappingsRejected"
    # ToolMapping / MCPConnection
    ACCEPTED = "Accepted"
    SERVER_NOT_FOUND = "ServerNotFound"
    CONNECTION_NOT_FOUND = "ConnectionNotFound"
    DUPLICATE_TOOL_NAME = "DuplicateToolName"
    INVALID_TOOL_NAME = "InvalidToolName"
    INVALID_RULE = "InvalidRule"
    UNKNOWN_UPSTREAM_TOOL = "UnknownUpstreamTool"
    UNUSED = "Unused"


class Phase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"
