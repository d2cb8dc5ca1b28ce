"""A real OAuth 2.1 authorization server for the tests: oidc-provider.

It plays two parts: the authorization server of an OAuth-protected upstream ("connected
accounts"), and the company OpenID Connect issuer whose JWT access tokens an interactive MCP
client (mcp-remote, the SDK's `OAuthClientProvider`) presents to the gateway.

`oauth_provider()` runs tests/support/oidc/provider.mjs (oidc-provider, npm, pinned in
package.json, an OpenID-certified server nobody here wrote) under the Node runtime package.json
pins, on 127.0.0.1 and a port the kernel picks (or `port=`). What it is configured to do (PKCE
S256 required, rotating refresh tokens with reuse refused, RFC 8707 resource indicators giving
RS256 JWT access tokens whose `aud` is the resource, open dynamic registration, one
pre-registered confidential client, revocation, introspection) is described at the top of that
script.

For a resource server's tests (the gateway validating tokens):

- `groups={"ada": ["mcp-users"], "grace": []}` puts a `groups` claim in those subjects' access
  tokens (`Provider.set_groups` changes it while running);
- any http://127.0.0.1 URL is a resource, with the scopes `RESOURCE_SCOPES` (`mcp:tools` among
  them), which land in the token's `scope` claim;
- `Provider.token_for(resource, login=..., scope=...)` gets an access token without a browser
  (dynamic registration, PKCE, the consent below, the code exchange), and
  `Provider.expired_token_for(...)` one that has just expired (a client whose tokens live one
  second, then a wait of about two seconds);
- signing keys: `new_signing_key()` makes one; `oauth_provider(keys=[a])` starts with it, and
  `Provider.rotate([b, a])` makes b sign from then on with a still published (`[b]`: a is gone),
  on the same issuer, keeping every registration, grant and refresh token. `oauth_provider(port=
  provider.port, keys=...)` after the first has stopped is the other way, a restart: same issuer,
  nothing kept.

A user's consent is given with plain HTTP: `Provider.consent()` fetches the authorization URL,
posts the development login form and then the consent form, with a cookie jar, and returns the
redirect the provider sends the browser to, without following it. HTTP form posts were chosen
over a headless browser because oidc-provider's development login and consent pages are plain
HTML forms with no script to run, so a browser would add nothing but a large install (Chromium
and playwright-core) and a slower, flakier suite; driving those forms over HTTP is what was
checked end to end on these machines (/work/shared/TESTING.md).

Without Node or oidc-provider (`npm ci` not run) the tests that need it are skipped, with the
reason, except under CI (`CI` set), where that is a failure: CI runs `npm ci`, so a skip there
would hide a broken set-up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.foreign import node
from tests.support.servers import REPO_ROOT, SHUTDOWN_TIMEOUT, ServerStartError, stop

OIDC_PROVIDER_VERSION = "9.13.3"
OIDC_PROVIDER = REPO_ROOT / "node_modules" / "oidc-provider"
PROVIDER_SCRIPT = Path(__file__).resolve().parent / "oidc" / "provider.mjs"

STARTUP_TIMEOUT = 20.0
HTTP_TIMEOUT = 10.0
# An authorization is login, consent and their redirects: a handful of hops. More means a loop.
MAX_INTERACTION_STEPS = 12

DEFAULT_CLIENT_ID = "portcullis-test"
DEFAULT_CLIENT_SECRET = "portcullis-test-secret-not-for-production"
DEFAULT_REDIRECT_URIS = ("http://127.0.0.1:1/callback",)
# The scopes every resource server (any http://127.0.0.1 URL) has at this provider; the OpenID
# scopes `openid` and `offline_access` come on top. `mcp:tools` is the gateway's.
RESOURCE_SCOPES = ("mail.read", "mail.send", "mcp:tools")
MCP_SCOPE = "mcp:tools"
# Where the clients `token_for` registers are redirected: never called, consent() stops there.
TOKEN_CLIENT_REDIRECT_URI = "http://127.0.0.1:1/callback"
# An expired token is made by a client whose access tokens live this long, then a wait.
SHORT_ACCESS_TOKEN_TTL = 1
MAX_EXPIRED_BY = 30.0


class ProviderError(RuntimeError):
    """The provider answered something a consenting (or refusing) user could not get past."""


# --- what is installed ----------------------------------------------------------------------


def oidc_provider_missing() -> str | None:
    """Why the provider cannot run here, or None."""
    if node() is None:
        return "node is not installed: run `npm ci` at the repository root (package.json pins a Node runtime)"
    manifest = OIDC_PROVIDER / "package.json"
    if not manifest.is_file():
        return "oidc-provider is not installed: run `npm ci` at the repository root"
    version = json.loads(manifest.read_text()).get("version")
    if version != OIDC_PROVIDER_VERSION:
        return f"oidc-provider {version} is installed, the tests were written for {OIDC_PROVIDER_VERSION}: run `npm ci`"
    return None


def unavailable(reason: str) -> NoReturn:
    """Skip, or under CI fail: CI installs the npm packages, so missing ones are a broken set-up."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run `npm ci` before the tests", pytrace=False)
    pytest.skip(reason)


# --- the interaction pages --------------------------------------------------------------------


class _InteractionPage(HTMLParser):
    """The first form on a page (its action and fields) and the page's abort link, if any."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.abort: str | None = None
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form" and self.action is None:
            self.action = attributes.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and attributes.get("name"):
            self.fields[attributes["name"]] = attributes.get("value", "")
        elif tag == "a" and attributes.get("href", "").endswith("/abort"):
            self.abort = attributes["href"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


# --- signing keys -----------------------------------------------------------------------------


def new_signing_key(kid: str | None = None) -> dict[str, str]:
    """A new RSA private key (2048 bits) as a JWK for `keys=`/`Provider.rotate`, with `kid` (a
    fresh random one by default), `alg` RS256 and `use` sig. Public half: `public_jwk(key)`."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, str] = jwt.algorithms.RSAAlgorithm.to_jwk(private, as_dict=True)
    return {**jwk, "kid": kid or f"test-{secrets.token_hex(6)}", "alg": "RS256", "use": "sig"}


def public_jwk(key: Mapping[str, str]) -> dict[str, str]:
    """The public half of an RSA JWK (what a JWKS publishes)."""
    return {name: value for name, value in key.items() if name not in {"d", "p", "q", "dp", "dq", "qi", "oth"}}


def _group_list(groups: Sequence[str]) -> list[str]:
    if isinstance(groups, str):  # a str is a Sequence[str] too: "admins" is not ["a", "d", ...]
        raise TypeError(f"groups must be a list of names, not the string {groups!r}")
    return list(groups)


# --- the running provider ---------------------------------------------------------------------


@dataclass
class Provider:
    """A running oidc-provider: its issuer, the pre-registered confidential client, test controls."""

    issuer: str
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    stderr: list[str] = field(default_factory=list, repr=False)
    """What the provider wrote on stderr so far (its warnings, and any server_error)."""
    _token_clients: dict[int | None, str] = field(default_factory=dict, repr=False)

    # -- discovery

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """The RFC 8414 authorization server metadata."""
        response = self._http("GET", "/.well-known/oauth-authorization-server")
        metadata: dict[str, Any] = response.json()
        return metadata

    @property
    def authorization_endpoint(self) -> str:
        return str(self.metadata["authorization_endpoint"])

    @property
    def token_endpoint(self) -> str:
        return str(self.metadata["token_endpoint"])

    @property
    def registration_endpoint(self) -> str:
        return str(self.metadata["registration_endpoint"])

    @property
    def port(self) -> int:
        """The issuer's port: `oauth_provider(port=provider.port)` restarts on the same issuer."""
        port = urlsplit(self.issuer).port
        assert port is not None
        return port

    def jwks(self) -> dict[str, Any]:
        """The JWKS the provider publishes now (at `jwks_uri`): the public keys, signer first."""
        with httpx2.Client(timeout=HTTP_TIMEOUT, trust_env=False) as http:
            response = http.get(str(self.metadata["jwks_uri"]))
        response.raise_for_status()
        keys: dict[str, Any] = response.json()
        return keys

    # -- the user at the provider's pages

    def consent(self, authorization_url: str, *, login: str = "ada") -> str:
        """Sign in as `login` (any login is accepted) and consent; the URL the provider then
        redirects the browser to: the client's redirect_uri with `code`, `state` and `iss` (or
        with `error`, if the request was refused). That redirect is not followed."""
        return self._authorize(authorization_url, login=login, refuse=False)

    def deny(self, authorization_url: str, *, login: str = "ada") -> str:
        """Sign in as `login`, then abort at the consent page; the redirect URL the provider
        answers with (the client's redirect_uri with `error=access_denied`), not followed."""
        return self._authorize(authorization_url, login=login, refuse=True)

    def _authorize(self, authorization_url: str, *, login: str, refuse: bool) -> str:
        provider = _origin(self.issuer)
        # A new cookie jar per authorization: a new browser, so there is no earlier login or
        # consent to reuse and each call sees the same pages.
        with httpx2.Client(follow_redirects=False, timeout=HTTP_TIMEOUT, trust_env=False) as browser:
            response = browser.get(authorization_url)
            for _ in range(MAX_INTERACTION_STEPS):
                if response.is_redirect:
                    location = urljoin(str(response.url), response.headers["location"])
                    if _origin(location) != provider:
                        return location  # leaving the provider: the client's redirect_uri
                    response = browser.get(location)
                    continue
                if response.status_code != 200:
                    raise ProviderError(f"{response.request.method} {response.url} answered {response.status_code}: {response.text[:2000]}")
                page = _InteractionPage()
                page.feed(response.text)
                if page.action is None:
                    raise ProviderError(f"no form on {response.url}: {response.text[:2000]}")
                action = urljoin(str(response.url), page.action)
                prompt = page.fields.get("prompt")
                if prompt == "login":
                    response = browser.post(action, data={**page.fields, "login": login, "password": "any password"})
                elif prompt == "consent" and refuse:
                    if page.abort is None:
                        raise ProviderError(f"no abort link on the consent page {response.url}")
                    response = browser.get(urljoin(str(response.url), page.abort))
                elif prompt == "consent":
                    response = browser.post(action, data=page.fields)
                else:
                    raise ProviderError(f"an interaction page this helper does not know (prompt {prompt!r}) at {response.url}")
        raise ProviderError(f"still at the provider after {MAX_INTERACTION_STEPS} steps")

    # -- tokens without a browser

    def register_client(self, *, access_token_ttl: int | None = None, redirect_uri: str = TOKEN_CLIENT_REDIRECT_URI) -> str:
        """Register a public client (RFC 7591, `token_endpoint_auth_method: none`); its client_id.
        `access_token_ttl` (seconds) makes that client's access tokens live that long."""
        body: dict[str, Any] = {
            "redirect_uris": [redirect_uri],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "client_name": "portcullis test tokens",
        }
        if access_token_ttl is not None:
            body["test_access_token_ttl"] = access_token_ttl
        with httpx2.Client(timeout=HTTP_TIMEOUT, trust_env=False) as http:
            response = http.post(self.registration_endpoint, json=body)
        if response.status_code != 201:
            raise ProviderError(f"registration answered {response.status_code}: {response.text[:2000]}")
        return str(response.json()["client_id"])

    def tokens_for(self, resource: str, *, login: str = "ada", scope: str = MCP_SCOPE, access_token_ttl: int | None = None) -> dict[str, Any]:
        """What a public client gets for `login`'s consent to `scope` at `resource` (RFC 8707):
        the token response (`access_token`, a JWT whose `aud` is `resource`; `refresh_token`,
        `scope`, `expires_in`). Authorization code with PKCE S256, no browser."""
        client_id = self._token_clients.get(access_token_ttl)
        if client_id is None:
            client_id = self._token_clients[access_token_ttl] = self.register_client(access_token_ttl=access_token_ttl)
        state, verifier = secrets.token_urlsafe(16), secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = {"response_type": "code", "client_id": client_id, "redirect_uri": TOKEN_CLIENT_REDIRECT_URI, "scope": scope,
                 "state": state, "code_challenge": challenge, "code_challenge_method": "S256", "resource": resource}  # fmt: skip
        redirect = self.consent(f"{self.authorization_endpoint}?{urlencode(query)}", login=login)
        params = {key: values[0] for key, values in parse_qs(urlsplit(redirect).query).items()}
        if "code" not in params or params.get("state") != state:
            raise ProviderError(f"the authorization was not granted: {redirect}")
        form = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": TOKEN_CLIENT_REDIRECT_URI,
                "client_id": client_id, "code_verifier": verifier, "resource": resource}  # fmt: skip
        with httpx2.Client(timeout=HTTP_TIMEOUT, trust_env=False) as http:
            response = http.post(self.token_endpoint, data=form)
        if response.status_code != 200:
            raise ProviderError(f"the code exchange answered {response.status_code}: {response.text[:2000]}")
        tokens: dict[str, Any] = response.json()
        return tokens

    def token_for(self, resource: str, *, login: str = "ada", scope: str = MCP_SCOPE) -> str:
        """An access token (RS256 JWT) for `login`, with `aud` = `resource` and `scope`, signed
        by the current first key; it expires after the provider's `access_token_ttl`."""
        return str(self.tokens_for(resource, login=login, scope=scope)["access_token"])

    def expired_token_for(self, resource: str, *, login: str = "ada", scope: str = MCP_SCOPE, expired_by: float = 1.0) -> str:
        """An access token like `token_for`'s that has been expired for at least `expired_by`
        seconds when this returns: issued to a client whose tokens live one second, after a
        wait (at most about `expired_by` + 2 s). A verifier allowing clock skew still accepts
        it while `expired_by` is under its leeway."""
        if not 0 <= expired_by <= MAX_EXPIRED_BY:
            raise ValueError(f"expired_by must be within 0..{MAX_EXPIRED_BY} seconds")
        token = str(self.tokens_for(resource, login=login, scope=scope, access_token_ttl=SHORT_ACCESS_TOKEN_TTL)["access_token"])
        expires = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        # Waiting for the clock is what expiry is; nothing else is waited for here.
        time.sleep(max(0.0, expires + expired_by - time.time()))
        return token

    # -- test controls (provider.mjs's /test/ endpoints)

    def rotate(self, keys: Sequence[Mapping[str, str]]) -> list[str]:
        """Sign with `keys[0]` from now on and publish all of `keys` (and only them), on the
        same issuer, keeping registrations, grants, refresh tokens and logins; the kids, in order."""
        answer = self._http("POST", "/test/rotate", body={"keys": [dict(key) for key in keys]}).json()
        return [str(kid) for kid in answer["kids"]]

    def set_groups(self, changes: Mapping[str, Sequence[str] | None]) -> dict[str, list[str]]:
        """Set (a list) or drop (None) subjects' `groups` claim for tokens issued from now on;
        the whole map after the change."""
        body = {sub: None if groups is None else _group_list(groups) for sub, groups in changes.items()}
        everyone: dict[str, list[str]] = self._http("POST", "/test/groups", body=body).json()
        return everyone

    def revoke(self, sub: str) -> dict[str, Any]:
        """Drop every grant, code and refresh token of `sub`: their next refresh is invalid_grant.
        JWT access tokens already issued stay valid until they expire (they are not stored)."""
        summary: dict[str, Any] = self._http("POST", "/test/revoke", params={"sub": sub}).json()
        return summary

    def events(self) -> dict[str, Any]:
        """Token-endpoint outcomes since the last reset: `{grant_type: {sub: n}}`, failures under
        `{grant_type}_errors`, and `errors`, a list of `{grant_type, sub, error, detail}` (detail: oidc-provider's reason,
        e.g. "refresh token already used", which the client only sees as invalid_grant)."""
        counts: dict[str, Any] = self._http("GET", "/test/events").json()
        return counts

    def reset_events(self) -> None:
        self._http("POST", "/test/reset-events")

    def _http(self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None) -> httpx2.Response:
        with httpx2.Client(timeout=HTTP_TIMEOUT, trust_env=False) as http:
            response = http.request(method, self.issuer + path, params=params, json=body)
        if response.status_code == 400 and path.startswith("/test/"):
            raise ProviderError(f"{method} {path}: {response.json().get('error')}")
        response.raise_for_status()
        return response


@contextmanager
def oauth_provider(
    *,
    access_token_ttl: int = 60,
    refresh_token_ttl: int = 3600,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
    redirect_uris: Sequence[str] = DEFAULT_REDIRECT_URIS,
    token_endpoint_auth_method: str = "client_secret_basic",
    port: int = 0,
    keys: Sequence[Mapping[str, str]] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    resource_scopes: Sequence[str] = RESOURCE_SCOPES,
) -> Iterator[Provider]:
    """Start the provider; stop it on exit. Skips (fails under CI) without Node or oidc-provider.

    `client_id`/`client_secret`/`redirect_uris` pre-register one confidential client that
    authenticates at the token endpoint with `token_endpoint_auth_method`. Lifetimes are seconds.
    `port` 0 lets the kernel pick; a fixed one (a stopped provider's `port`) gives the same issuer.
    `keys` are private JWKs (`new_signing_key()`), the first signing; by default one is made.
    `groups` maps subjects to their `groups` claim; `resource_scopes` are every resource's scopes.
    """
    missing = oidc_provider_missing()
    if missing is not None:
        unavailable(missing)
    node_binary = node()
    assert node_binary is not None
    config: dict[str, Any] = {
        "accessTokenTtl": access_token_ttl,
        "refreshTokenTtl": refresh_token_ttl,
        "port": port,
        "resourceScopes": " ".join(resource_scopes),
        "groups": {sub: _group_list(names) for sub, names in (groups or {}).items()},
        "clients": [
            {
                "client_id": client_id,
                "client_secret": client_secret,
                "redirect_uris": list(redirect_uris),
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": token_endpoint_auth_method,
            }
        ],
    }
    if keys is not None:
        config["keys"] = [dict(key) for key in keys]
    process = subprocess.Popen(
        [node_binary, str(PROVIDER_SCRIPT), json.dumps(config)],
        cwd=REPO_ROOT,  # node resolves oidc-provider from the script's directory upwards
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NODE_ENV": "test"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout, process.stderr
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []

    # Both pipes are drained for the whole run: a full pipe would block the provider.
    def read_stdout() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    readers = [
        threading.Thread(target=read_stdout, name="oidc-provider-stdout", daemon=True),
        threading.Thread(target=lambda: errors.extend(stderr), name="oidc-provider-stderr", daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        try:
            ready = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            ready = None
        if ready is None or not ready.startswith("READY "):
            process.kill()
            process.wait(SHUTDOWN_TIMEOUT)
            readers[1].join(SHUTDOWN_TIMEOUT)
            raise ServerStartError(f"oidc-provider printed no ready line within {STARTUP_TIMEOUT}s (got {ready!r}); stderr:\n{''.join(errors)}")
        issuer = ready.split(maxsplit=1)[1].strip()
        yield Provider(issuer, client_id, client_secret, tuple(redirect_uris), stderr=errors)
    finally:
        stop(process)
        for reader in readers:
            reader.join(SHUTDOWN_TIMEOUT)
        stdout.close()
        stderr.close()
