"""The operator: kopf handlers (the only package that imports kopf, the only Kubernetes writer)."""
