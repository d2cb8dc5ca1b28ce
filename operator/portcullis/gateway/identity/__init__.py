"""Who is calling: session tokens (tokens.py), their revocation (revocation.py), who may mint (admission.py) and OpenID Connect access tokens (oidc.py)."""
