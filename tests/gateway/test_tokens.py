from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from portcullis.gateway.identity.tokens import (
    LocalKeyStore,
    SessionClaims,
    SigningKeys,
    TokenError,
    TokenVerifier,
    mint_token,
)

ISS = "portcullis:acme/summarizer"
AUD = "http://summarizer.acme.svc:8080/mcp"


def _mint(keys: SigningKeys, **overrides: object) -> tuple[str, SessionClaims]:
    args: dict[str, object] = {
        "issuer": ISS, "audience": AUD, "user": "alice@example.com", "tenant": "acme", "ttl_seconds": 900,
    }
    args.update(overrides)
    return mint_token(keys, **args)  # type: ignore[arg-type]


def _verifier(keys: SigningKeys, **overrides: object) -> TokenVerifier:
    return TokenVerifier(lambda: keys, issuer=str(overrides.get("issuer", ISS)), audience=str(overrides.get("audience", AUD)))


def _reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert not token or token not in str(err.value)
    return err.value.reason


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_minted_token_verifies_to_its_claims() -> None:
    keys = SigningKeys.generate()
    token, claims = _mint(keys, tools=("gmail_fetch",))
    assert _verifier(keys).verify(token) == claims
    assert claims.sub == "alice@example.com" and claims.tenant == "acme" and claims.tools == ("gmail_fetch",)
    assert claims.exp - int(claims.iat) == 900
    assert len(bytes.fromhex(claims.jti)) == 16 and not claims.jti.startswith("-")
    assert jwt.get_unverified_header(token)["kid"] == keys.current.kid


def test_tokens_without_a_scope_have_tools_none() -> None:
    keys = SigningKeys.generate()
    token, claims = _mint(keys)
    assert claims.tools is None and _verifier(keys).verify(token).tools is None


def test_jtis_are_unique() -> None:
    keys = SigningKeys.generate()
    assert len({_mint(keys)[1].jti for _ in range(50)}) == 50


def test_expired_tokens_are_rejected() -> None:
    keys = SigningKeys.generate()
    token, _ = _mint(keys, now=int(time.time()) - 1000, ttl_seconds=60)
    assert _reason(_verifier(keys), token) == "expired"


def test_a_token_for_another_server_is_rejected() -> None:
    keys = SigningKeys.generate()
    token, _ = _mint(keys, audience="http://other.acme.svc:8080/mcp")
    assert _reason(_verifier(keys), token) == "wrong audience"


def test_a_token_signed_by_a_foreign_key_with_our_kid_is_rejected() -> None:
    ours, theirs = SigningKeys.generate(), SigningKeys.generate()
    token, _ = _mint(theirs)
    header, payload, sig = token.split(".")
    forged_header = _b64({"alg": "EdDSA", "typ": "JWT", "kid": ours.current.kid})
    assert _reason(_verifier(ours), f"{forged_header}.{payload}.{sig}") == "bad signature"


def test_a_tampered_payload_is_rejected() -> None:
    keys = SigningKeys.generate()
    token, claims = _mint(keys)
    header, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["sub"] = "mallory"
    assert _reason(_verifier(keys), f"{header}.{_b64(body)}.{sig}") == "bad signature"


def test_a_kid_we_do_not_know_is_rejected() -> None:
    token, _ = _mint(SigningKeys.generate())
    assert _reason(_verifier(SigningKeys.generate()), token) == "unknown key"


def test_alg_none_is_rejected() -> None:
    keys = SigningKeys.generate()
    token, _ = _mint(keys)
    _, payload, _ = token.split(".")
    header = _b64({"alg": "none", "typ": "JWT", "kid": keys.current.kid})
    assert _reason(_verifier(keys), f"{header}.{payload}.") == "unsupported algorithm"


def test_hs256_signed_with_the_public_key_is_rejected() -> None:
    keys = SigningKeys.generate()
    _, claims = _mint(keys)
    public_pem = keys.current.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payload = {"iss": ISS, "aud": AUD, "sub": "mallory", "tenant": "acme", "iat": claims.iat, "exp": claims.exp, "jti": "x"}
    # PyJWT itself refuses PEM keys as HMAC secrets, so sign by hand the way an attacker would.
    import hashlib
    import hmac
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': keys.current.kid})}.{_b64(payload)}"
    sig = base64.urlsafe_b64encode(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    assert _reason(_verifier(keys), f"{signing_input}.{sig}") == "unsupported algorithm"


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "eyJhbGciOiJFZERTQSJ9.e30", "....."])
def test_malformed_tokens_are_rejected(junk: str) -> None:
    assert _reason(_verifier(SigningKeys.generate()), junk) in {"malformed", "unknown key"}


def test_garbage_is_malformed() -> None:
    assert _reason(_verifier(SigningKeys.generate()), "not-a-token") == "malformed"


def test_rotation_keeps_old_tokens_valid_until_pruned() -> None:
    keys = SigningKeys.generate(now=1000)
    old_token, _ = _mint(keys)
    rotated = keys.rotate(now=2000)
    new_token, _ = _mint(rotated)
    assert jwt.get_unverified_header(new_token)["kid"] == rotated.current.kid != keys.current.kid
    verifier = _verifier(rotated)
    verifier.verify(old_token)
    verifier.verify(new_token)
    # The old key signed until 2000; with a 1h TTL its tokens are gone after 5600.
    assert rotated.prune(now=5600, keep_seconds=3600).keys == rotated.keys
    pruned = rotated.prune(now=5601, keep_seconds=3600)
    assert pruned.keys == (rotated.current,)
    assert _reason(_verifier(pruned), old_token) == "unknown key"


def test_prune_never_drops_the_current_key() -> None:
    keys = SigningKeys.generate(now=0)
    assert keys.prune(now=10**9, keep_seconds=1).keys == keys.keys


def test_key_sets_round_trip_through_json() -> None:
    keys = SigningKeys.generate(now=1).rotate(now=2)
    text = keys.to_json()
    doc = json.loads(text)
    assert [k["created"] for k in doc["keys"]] == [1, 2]
    assert doc["keys"][0]["privateKey"].startswith("-----BEGIN PRIVATE KEY-----")
    again = SigningKeys.from_json(text)
    assert [k.kid for k in again.keys] == [k.kid for k in keys.keys]
    token, _ = _mint(keys)
    _verifier(again).verify(token)


def test_a_key_document_with_a_lying_kid_is_refused() -> None:
    doc = json.loads(SigningKeys.generate().to_json())
    doc["keys"][0]["kid"] = "someone-else"
    with pytest.raises(ValueError):
        SigningKeys.from_json(json.dumps(doc))


def test_the_verifier_follows_the_provider_to_new_key_sets() -> None:
    holder = [SigningKeys.generate()]
    verifier = TokenVerifier(lambda: holder[0], issuer=ISS, audience=AUD)
    holder[0] = holder[0].rotate()
    token, _ = _mint(holder[0])
    verifier.verify(token)


def test_public_keys_are_parsed_once_per_key_set() -> None:
    keys = SigningKeys.generate()
    assert keys.public_keys is keys.public_keys


def test_local_key_store_creates_once_with_private_modes(tmp_path: Path) -> None:
    store = LocalKeyStore(tmp_path)
    first = store.load_or_create("acme", "summarizer")
    second = LocalKeyStore(tmp_path).load_or_create("acme", "summarizer")
    assert first.current.kid == second.current.kid
    path = tmp_path / "keys" / "acme" / "summarizer.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(ValueError):
        store.load_or_create("..", "x")
