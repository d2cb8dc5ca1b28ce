"""`portcullis demo` runs the whole story end to end, with real parts."""

from __future__ import annotations

import io
import json
from pathlib import Path

from portcullis.demo import run_demo


def test_the_demo_shows_the_slice_the_token_the_call_and_the_audit(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_demo(state_dir=tmp_path / "fresh" / "state", out=out) == 0
    text = out.getvalue()
    assert "MCP URL (mcp_server_url): http://127.0.0.1:" in text
    assert "tools exposed / upstream: 2 / 35  (inbox_fetch_mails, search_mails)" in text
    assert "% fewer" in text
    assert "refused before the upstream: Unknown tool: send_mail" in text
    assert "audit: 1 allowed, 1 denied" in text
    audit_file = Path(text.split("JSON lines in ")[1].splitlines()[0].strip())
    assert "(SQLite): chains verified intact over 2 events" in text
    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [(e["tool"], e["decision"]) for e in events] == [("inbox_fetch_mails", "allow"), ("send_mail", "deny")]
    assert all(e["user"] == "ada@example.com" for e in events)
