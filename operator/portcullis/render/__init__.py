"""Pure builders: a VirtualMCPServer (and its compiled config) in, Kubernetes object dicts out."""
