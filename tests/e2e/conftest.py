"""The README's cluster quickstart, run once per session, verbatim, before the cluster tests.

Every cluster test depends on `readme_quickstart`: the README's commands build the image, load
it into kind and install the chart, so the suite runs on exactly what a reader gets, and a
README that stops working fails here first, with its transcript.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e import environment, quickstart
from tests.e2e.quickstart import QuickstartRun


@pytest.fixture(scope="session")
def readme_quickstart(tmp_path_factory: pytest.TempPathFactory) -> QuickstartRun:
    """The block between README.md's e2e markers, run by bash from the repository root."""
    if (reason := environment.skip_reason()) is not None:
        pytest.skip(reason)
    block = quickstart.script()
    directory = Path(environment.ARTIFACTS) if environment.ARTIFACTS else tmp_path_factory.mktemp("quickstart")
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "readme-quickstart.log"
    # A file, not a pipe: the port-forward the block leaves in the background keeps its output
    # open, and reading a pipe to its end would wait for it. Its own session, so that port-forward
    # is found and stopped with the group once the block is done.
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", block], cwd=quickstart.ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=environment.README_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    transcript = log.read_text(errors="replace")
    if code != 0:
        how = f"timed out after {environment.README_TIMEOUT}s" if code is None else f"exited {code}"
        pytest.fail(f"the README's cluster quickstart {how}; its last output ({log}):\n{transcript[-8000:]}", pytrace=False)
    return QuickstartRun(transcript, log)
