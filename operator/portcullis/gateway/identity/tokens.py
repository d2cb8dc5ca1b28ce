"""Session tokens: EdDSA (Ed25519) JWTs bound to one user, one tenant and one server.

Claims: ``iss``, ``aud`` (the server URL), ``sub`` (user), ``tenant``, ``iat``, ``exp``, ``jti``
(128 random bits) and an optional ``tools`` scope narrower than the server's allowlist. The
header carries ``kid``, the RFC 7638 thumbprint of the signing key.

Keys rotate: ``rotate`` appends a new current key, older keys keep verifying the tokens they
signed, and ``prune`` drops a key once every token it can have signed has expired. A key stops
signing when its successor is created, so its age is counted from then (see ``prune``).

Verification is on every request. It pins ``algorithms=["EdDSA"]`` (no ``none``, no HS256 signed
with a public key), rejects a ``kid`` that is not one of ours before any crypto, and uses public
key objects parsed once per ``SigningKeys`` (cached on the object), so a call does no key parsing.
Errors carry a short reason and never the token.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from portcullis.gateway import jsonwire
from portcullis.vault.local import create_private_file_once, make_private_dir

ALGORITHM = "EdDSA"
_REQUIRED = ["iss", "aud", "sub", "exp", "iat", "jti"]
READ_ONLY: Final = "read-only"
ACCESS_LEVELS: Final = (READ_ONLY,)
"""Values of the optional `access` claim; absent means full access within the token's scope."""
_SAFE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def thumbprint(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 key (OKP, RFC 8037), used as its kid."""
    x = _b64url(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclasses.dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey = dataclasses.field(repr=False)
    created_at: int

    @classmethod
    def generate(cls, now: int) -> SigningKey:
        key = Ed25519PrivateKey.generate()
        return cls(thumbprint(key.public_key()), key, now)


@dataclasses.dataclass(frozen=True)
class SigningKeys:
    """An immutable key set, oldest first; the last key is the current (signing) one."""

    keys: tuple[SigningKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a key set needs at least one key")

    @classmethod
    def generate(cls, now: int | None = None) -> SigningKeys:
        return cls((SigningKey.generate(_now(now)),))

    @property
    def current(self) -> SigningKey:
        return self.keys[-1]

    def rotate(self, now: int | None = None) -> SigningKeys:
        """A key set with a new current key; the old ones stay to verify what they signed."""
        return SigningKeys((*self.keys, SigningKey.generate(_now(now))))

    def prune(self, now: int, keep_seconds: int) -> SigningKeys:
        """Drop retired keys whose every token has expired.

        A key signs until its successor is created, so it is dropped once that successor is
        older than ``keep_seconds`` (pass the longest token TTL plus the verifier's leeway).
        """
        kept = [
            key for key, successor in zip(self.keys, self.keys[1:])
            if now - successor.created_at <= keep_seconds
        ]
        return SigningKeys((*kept, self.current))

    @functools.cached_property
    def public_keys(self) -> Mapping[str, Ed25519PublicKey]:
        """kid -> public key, computed once per key set (verification's hot path reads this)."""
        return {key.kid: key.private_key.public_key() for key in self.keys}

    def to_json(self) -> str:
        return json.dumps({"keys": [
            {
                "kid": key.kid,
                "created": key.created_at,
                "privateKey": key.private_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ).decode("ascii"),
            }
            for key in self.keys
        ]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SigningKeys:
        try:
            entries = json.loads(text)["keys"]
            keys = []
            for entry in entries:
                private = serialization.load_pem_private_key(entry["privateKey"].encode("ascii"), password=None)
                if not isinstance(private, Ed25519PrivateKey):
                    raise ValueError("not an Ed25519 key")
                kid = thumbprint(private.public_key())
                if entry.get("kid", kid) != kid:
                    raise ValueError(f"kid {entry['kid']!r} does not match its key")
                keys.append(SigningKey(kid, private, int(entry["created"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid signing keys document: {e}") from None
        return cls(tuple(keys))


@dataclasses.dataclass(frozen=True)
class SessionClaims:
    iss: str
    aud: str
    sub: str
    tenant: str
    exp: int
    iat: float
    """Issued-at, to the millisecond (RFC 7519 NumericDate allows fractions): revocation by user compares it."""
    jti: str
    tools: tuple[str, ...] | None = None
    agent_run_id: str | None = None
    """Set by the application at minting, so the calls of one agent run group together in the audit log."""
    access: str | None = None
    """`read-only`: the token sees and calls only read-only tools (policy/pipeline.py); None: full."""


class TokenError(Exception):
    """A token that does not authenticate; ``reason`` is short and safe to return and log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


def mint_token(
    keys: SigningKeys,
    *,
    issuer: str,
    audience: str,
    user: str,
    tenant: str,
    ttl_seconds: int,
    tools: tuple[str, ...] | None = None,
    agent_run_id: str | None = None,
    access: str | None = None,
    now: float | None = None,
    after: float | None = None,
) -> tuple[str, SessionClaims]:
    """Sign a session token with the current key."""
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    if not user:
        raise ValueError("a token needs a user")
    # Milliseconds, and strictly after `after` (the user's last revocation): a token minted
    # right after "revoke every token of U" must not fall under it, whatever the clock's grain.
    iat = round(time.time() if now is None else now, 3)
    if after is not None and iat <= after:
        iat = round(after + 0.001, 3)
    claims = SessionClaims(
        iss=issuer, aud=audience, sub=user, tenant=tenant, iat=iat, exp=int(iat) + ttl_seconds,
        # Hex, not base64url: a jti is typed on command lines, and one starting with "-" reads as a flag.
        jti=secrets.token_hex(16), tools=tuple(tools) if tools is not None else None,
        agent_run_id=agent_run_id, access=access,
    )
    payload: dict[str, Any] = {
        "iss": claims.iss, "aud": claims.aud, "sub": claims.sub, "tenant": claims.tenant,
        "iat": claims.iat, "exp": claims.exp, "jti": claims.jti,
    }
    if claims.tools is not None:
        payload["tools"] = list(claims.tools)
    if claims.agent_run_id is not None:
        payload["agent_run_id"] = claims.agent_run_id
    if claims.access is not None:
        payload["access"] = claims.access
    key = keys.current
    token = jwt.encode(payload, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})
    return token, claims


class TokenVerifier:
    """Checks session tokens of one server against the current key set."""

    def __init__(
        self, keys_provider: Callable[[], SigningKeys], *, issuer: str, audience: str, leeway: int = 5
    ) -> None:
        self._keys = keys_provider
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway

    @property
    def keys(self) -> Callable[[], SigningKeys]:
        """The key set provider (also signs the session protocol's ids: session_ids.py)."""
        return self._keys

    def verify(self, token: str) -> SessionClaims:
        header = unverified_header(token)
        if header.get("alg") != ALGORITHM:
            raise TokenError("unsupported algorithm")
        kid = header.get("kid")
        public = self._keys().public_keys.get(kid) if isinstance(kid, str) else None
        if public is None:
            raise TokenError("unknown key")
        with jwt_refusals():
            payload = jwt.decode(
                token,
                public,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED, "strict_aud": True},
            )
        return _claims(payload)


@contextlib.contextmanager
def jwt_refusals(wrong_audience: str = "wrong audience") -> Iterator[None]:
    """PyJWT's refusals as `TokenError`s with short, safe reasons (session and OIDC tokens alike)."""
    try:
        yield
    except jwt.ExpiredSignatureError:
        raise TokenError("expired") from None
    except jwt.InvalidAudienceError:
        raise TokenError(wrong_audience) from None
    except jwt.InvalidIssuerError:
        raise TokenError("wrong issuer") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("not yet valid") from None
    except jwt.MissingRequiredClaimError:
        raise TokenError("missing claim") from None
    except jwt.InvalidSignatureError:
        raise TokenError("bad signature") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError("unsupported algorithm") from None
    except jwt.InvalidTokenError:
        raise TokenError("malformed") from None


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, parsed only to pick the key; PyJWT validates the whole token after.

    Done here because ``jwt.get_unverified_header`` costs about a quarter of a verification.
    """
    head, dot, _ = token.partition(".")
    try:
        header = jsonwire.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, TypeError):  # binascii.Error, JSONDecodeError and too deep a nesting are ValueErrors
        raise TokenError("malformed") from None
    if not dot or not isinstance(header, dict):
        raise TokenError("malformed")
    return header


def _claims(payload: Mapping[str, Any]) -> SessionClaims:
    tenant, tools = payload.get("tenant"), payload.get("tools")
    str_fields = [payload[k] for k in ("iss", "aud", "sub", "jti")]
    if not isinstance(tenant, str) or not all(isinstance(v, str) for v in str_fields):
        raise TokenError("malformed")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, str) for t in tools)):
        raise TokenError("malformed")
    iat = payload["iat"]
    if not isinstance(payload["exp"], int) or isinstance(iat, bool) or not isinstance(iat, (int, float)):
        raise TokenError("malformed")
    run, access = payload.get("agent_run_id"), payload.get("access")
    if run is not None and not isinstance(run, str):
        raise TokenError("malformed")
    if access is not None and access not in ACCESS_LEVELS:
        raise TokenError("unknown access level")  # fail closed: a level this gateway does not know grants nothing
    return SessionClaims(
        iss=payload["iss"], aud=payload["aud"], sub=payload["sub"], tenant=tenant,
        exp=payload["exp"], iat=payload["iat"], jti=payload["jti"],
        tools=tuple(tools) if tools is not None else None, agent_run_id=run, access=access,
    )


class LocalKeyStore:
    """Signing keys for ``portcullis serve``: ``<state_dir>/keys/<namespace>/<server>.json``, 0600."""

    def __init__(self, state_dir: Path) -> None:
        self._root = Path(state_dir) / "keys"

    def path(self, namespace: str, server: str) -> Path:
        for name in (namespace, server):
            if not _SAFE_NAME.fullmatch(name):
                raise ValueError(f"invalid namespace or server name {name!r}")
        return self._root / namespace / f"{server}.json"

    def load_or_create(self, namespace: str, server: str) -> SigningKeys:
        path = self.path(namespace, server)
        try:
            return SigningKeys.from_json(path.read_text("utf-8"))
        except FileNotFoundError:
            pass
        make_private_dir(self._root)
        make_private_dir(path.parent)
        # Exclusive create: two processes starting together end up with the same keys.
        text = create_private_file_once(path, SigningKeys.generate().to_json().encode("utf-8"))
        return SigningKeys.from_json(text.decode("utf-8"))
