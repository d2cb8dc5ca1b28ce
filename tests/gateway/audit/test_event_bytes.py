"""The bytes an event is written as, and hashed over, never change.

Every stored chain was hashed over the canonical JSON of its events, and auditors' tools read
the JSON lines: these expected values were computed by the code that wrote the existing trails,
so an encoder made faster must give exactly them (for plain ASCII and for the characters JSON
escapes differently in its two forms: non-ASCII, DEL, control characters, quotes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from portcullis.gateway.audit.chain import GENESIS, ChainWriter, link_hash
from portcullis.gateway.audit.encoding import canonical_json
from portcullis.gateway.audit.events import AuditEvent, new_request_id
from portcullis.gateway.audit.keys import AuditKey, KeyedHash

KEY = AuditKey(bytes(range(32)))
PLAIN = AuditEvent(
    time_us=1_796_000_000_123_456, request_id="5f0c3a9e1b2d4c6e8f7a9b0c1d2e3f40", server="acme/summarizer", tenant="acme",
    user="ada@example.com", method="tools/call", tool="fetch_mails", connection="inbox", decision="allow",
    reason="allowlisted", outcome="ok", latency_ms=1.25, upstream_ms=0.5, jti="j1",
    args_digest="hmac-sha256:" + "a" * 64, result_digest="hmac-sha256:" + "b" * 64,
)
ODD = AuditEvent(
    time_us=1_796_000_000_000_001, request_id="r2", server="acme/summarizer", tenant="acme", user="zo\u00eb@\u4f8b\u3048.jp",
    method="tools/call", tool='a"b\\c\nd\x7fe\u2028', connection=None, decision="deny", reason="argument_rule",
    outcome="denied", latency_ms=1e-07, upstream_ms=None, jti=None, agent_run_id="run-\U0001f600",
    detail="\x01\t\b\f\r end",
)


def test_the_json_line_keeps_its_bytes() -> None:
    assert PLAIN.to_json() == (
        '{"kind":"portcullis.audit/v1","time":"2026-11-30T00:53:20.123456Z","time_us":1796000000123456,"request_id":"5f0c3a9e1b2d4c6e8f7a9b0c1d2e3f40","server":"acme/summarizer","tenant":"acme","user":"ada@example.com","method":"tools/call","tool":"fetch_mails","connection":"inbox","decision":"allow","reason":"allowlisted","outcome":"ok","latency_ms":1.25,"upstream_ms":0.5,"jti":"j1","agent_run_id":null,"args_digest":"hmac-sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","result_digest":"hmac-sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","detail":null}'
    )
    assert ODD.to_json() == (
        '{"kind":"portcullis.audit/v1","time":"2026-11-30T00:53:20.000001Z","time_us":1796000000000001,"request_id":"r2","server":"acme/summarizer","tenant":"acme","user":"zo\\u00eb@\\u4f8b\\u3048.jp","method":"tools/call","tool":"a\\"b\\\\c\\nd\\u007fe\\u2028","connection":null,"decision":"deny","reason":"argument_rule","outcome":"denied","latency_ms":1e-07,"upstream_ms":null,"jti":null,"agent_run_id":"run-\\ud83d\\ude00","args_digest":null,"result_digest":null,"detail":"\\u0001\\t\\b\\f\\r end"}'
    )


def test_the_canonical_form_keeps_its_bytes() -> None:
    assert canonical_json(PLAIN.to_dict()) == (
        b'{"agent_run_id":null,"args_digest":"hmac-sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","connection":"inbox","decision":"allow","detail":null,"jti":"j1","kind":"portcullis.audit/v1","latency_ms":1.25,"method":"tools/call","outcome":"ok","reason":"allowlisted","request_id":"5f0c3a9e1b2d4c6e8f7a9b0c1d2e3f40","result_digest":"hmac-sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","server":"acme/summarizer","tenant":"acme","time":"2026-11-30T00:53:20.123456Z","time_us":1796000000123456,"tool":"fetch_mails","upstream_ms":0.5,"user":"ada@example.com"}'
    )
    assert canonical_json(ODD.to_dict()) == (
        b'{"agent_run_id":"run-\xf0\x9f\x98\x80","args_digest":null,"connection":null,"decision":"deny","detail":"\\u0001\\t\\b\\f\\r end","jti":null,"kind":"portcullis.audit/v1","latency_ms":1e-07,"method":"tools/call","outcome":"denied","reason":"argument_rule","request_id":"r2","result_digest":null,"server":"acme/summarizer","tenant":"acme","time":"2026-11-30T00:53:20.000001Z","time_us":1796000000000001,"tool":"a\\"b\\\\c\\nd\x7fe\xe2\x80\xa8","upstream_ms":null,"user":"zo\xc3\xab@\xe4\xbe\x8b\xe3\x81\x88.jp"}'
    )


def test_links_hash_as_the_stored_chains_were_hashed() -> None:
    assert link_hash(KEY.chain_key, "pod-a/1/x", 7, "ab" * 32, PLAIN) == "d1bde3729f6a42dabef4123fa54333f339e55bdf7d444de6797148b09757d82f"
    assert link_hash(KEY.chain_key, "pod-a/1/x", 7, "ab" * 32, ODD) == "bb667afc578542f923ba9728967d13ac605eaf1a088fb963d5119616675a620f"
    writer = ChainWriter(KEY.chain_key, "pod-a/1/x")
    first, second = writer.link(PLAIN), writer.link(ODD)  # ODD is older: linked at PLAIN's time
    assert (first.prev_hash, first.hash) == (GENESIS, "904922781c4534c9451bb8107da8a2760bf0dcffea480416aba1e31704379a2e")
    assert (second.prev_hash, second.hash) == (first.hash, "c9eb7594e0f7eb354b800c67f36d42000c20bb81c6f93858a7feb8dd6904aba3")


def test_digests_keep_their_bytes() -> None:
    value = {"text": "hello", "n": [1, 2.5, None, True, False], "\u00fc": {"z": 1, "a": -0.0}}
    assert KEY.digest(value) == "hmac-sha256:fec9bdd5d91735f36f09672f8ce7147be141d5978373f0ff8c24778d5dce755d"
    assert KEY.digest(float("nan")) == "hmac-sha256:7bc037b27a4605af634375bde7ad02dba47ab95e5cdd96c2a6ec223011e375c2"  # not JSON: its repr
    assert KEY.digest("x") == "hmac-sha256:655d6b43e0107bb978fea32ba6f0b8e84b701293a89b8ad4e11781d2a0c6918b"
    assert KEY.digest(None) is None


def test_request_ids_are_128_random_bits_in_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


FORKED = """
import os
from portcullis.gateway.audit.events import new_request_id
new_request_id()  # the parent now holds a draw of ids not yet handed out
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, " ".join(new_request_id() for _ in range(50)).encode())
    os._exit(0)
os.close(write)
child = os.read(read, 1 << 16).decode()
os.waitpid(pid, 0)
print(child)
print(" ".join(new_request_id() for _ in range(50)))
"""


def test_a_forked_child_does_not_hand_out_the_ids_its_parent_drew() -> None:
    # In a fresh interpreter: forking this test process, with other tests' threads in it, could
    # copy a lock some thread holds.
    run = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=60, check=True)
    child, parent = (set(line.split()) for line in run.stdout.splitlines())
    assert len(child) == 50 and len(parent) == 50 and not child & parent


@given(key=st.binary(max_size=200), message=st.binary(max_size=300))
def test_the_keyed_hash_is_hmac_sha256(key: bytes, message: bytes) -> None:
    assert KeyedHash(key).hexdigest(message) == hmac.new(key, message, hashlib.sha256).hexdigest()


# --- the fast forms against the json.dumps calls they replace, over generated events ------------

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates, DEL, controls too
OPTIONAL_TEXT = st.none() | TEXT
NUMBER = st.floats() | st.integers(-(10**20), 10**20)  # NaN and infinities included
EVENTS = st.builds(
    AuditEvent,
    time_us=st.integers(0, 4_102_444_800_000_000), request_id=TEXT, server=TEXT, tenant=TEXT, user=OPTIONAL_TEXT,
    method=TEXT, tool=OPTIONAL_TEXT, connection=OPTIONAL_TEXT, decision=st.sampled_from(["allow", "deny"]),
    reason=TEXT, outcome=st.sampled_from(["ok", "error"]), latency_ms=NUMBER, upstream_ms=st.none() | NUMBER,
    jti=OPTIONAL_TEXT, agent_run_id=OPTIONAL_TEXT, args_digest=OPTIONAL_TEXT, result_digest=OPTIONAL_TEXT,
    detail=OPTIONAL_TEXT, kind=TEXT,
)


def outcome_of(make: Callable[[], object]) -> object:
    """What `make` returns, or the type of what it raises (so failures must match too)."""
    try:
        return make()
    except (TypeError, ValueError) as exc:  # a NaN in the canonical form, a lone surrogate in UTF-8
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(EVENTS, TEXT, st.integers(0, 2**63), TEXT)
def test_every_event_is_written_and_linked_as_json_dumps_wrote_it(event: AuditEvent, writer: str, seq: int, prev: str) -> None:
    def line() -> str:
        return json.dumps(event.to_dict(), separators=(",", ":"))

    def canonical() -> bytes:
        return json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def link() -> str:
        wrapped = {"writer": writer, "seq": seq, "prev": prev, "event": event.to_dict()}
        material = json.dumps(wrapped, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return hmac.new(KEY.chain_key, material.encode(), hashlib.sha256).hexdigest()

    fresh = dataclasses.replace(event)  # nothing cached yet: the canonical form asked for first
    assert outcome_of(lambda: fresh.to_canonical_json().encode()) == outcome_of(canonical)
    assert outcome_of(event.to_json) == outcome_of(line)
    assert outcome_of(lambda: canonical_json(event.to_dict())) == outcome_of(canonical)
    assert outcome_of(lambda: event.to_canonical_json().encode()) == outcome_of(canonical)
    assert outcome_of(lambda: link_hash(KEY.chain_key, writer, seq, prev, event)) == outcome_of(link)


def test_an_event_given_a_new_time_is_written_with_it() -> None:
    PLAIN.to_json()  # both forms made and kept
    later = dataclasses.replace(PLAIN, time_us=PLAIN.time_us + 1)
    assert '"time_us":1796000000123457' in later.to_json() and '"time_us":1796000000123457' in later.to_canonical_json()
    assert later.to_json() == json.dumps(later.to_dict(), separators=(",", ":"))
    assert later != PLAIN and dataclasses.replace(later, time_us=PLAIN.time_us) == PLAIN
