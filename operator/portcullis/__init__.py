"""Portcullis: virtual MCP servers that expose an allowlisted slice of their upstreams' tools."""

__version__ = "0.1.0"
