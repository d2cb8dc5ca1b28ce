"""The credential-resolution benchmark runs at its smallest settings and reports both kinds.

Timing is its output, never this test's assertion: the benchmark itself refuses to report a
speed for a resolver whose header is not the stored credential.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_it_reports_a_static_secret_and_an_oauth_grant_per_vault() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.credential_resolution", "--calls", "20", "--rounds", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line, vault in zip(lines, ("local (serve)", "memory")):
        assert line.startswith(vault)
        assert re.search(r"static secret +[0-9.]+ us/call +OAuth grant +[0-9.]+ us/call +ratio +[0-9.]+x", line), line
