"""The data plane: the MCP endpoint, upstream pool, policy, session tokens, audit, metrics."""
