"""What the cluster e2e suite is told by its environment, and whether it may run at all.

The suite runs only with PORTCULLIS_E2E=1 and a kubeconfig (KUBECONFIG or ~/.kube/config). It
expects a fresh kind cluster named `kind` (what `kind create cluster` makes, and what the README's
`kind load docker-image` targets) with Docker, kind, Helm and kubectl on PATH: it runs the README's
quickstart first, which builds the image and installs the chart.

  PORTCULLIS_E2E=1                    opt in
  PORTCULLIS_E2E_IMAGE                the image the quickstart builds (default portcullis:dev)
  PORTCULLIS_E2E_OPERATOR_NAMESPACE   where the quickstart installs the chart (default portcullis-system)
  PORTCULLIS_E2E_TIMEOUT              seconds for each wait (default 180)
  PORTCULLIS_E2E_README_TIMEOUT       seconds for the whole quickstart, image build included (default 1800)
  PORTCULLIS_E2E_ARTIFACTS            a directory for the quickstart's transcript (default: a temp dir)
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE = os.environ.get("PORTCULLIS_E2E_IMAGE", "portcullis:dev")
OPERATOR_NAMESPACE = os.environ.get("PORTCULLIS_E2E_OPERATOR_NAMESPACE", "portcullis-system")
TIMEOUT = int(os.environ.get("PORTCULLIS_E2E_TIMEOUT", "180"))
README_TIMEOUT = int(os.environ.get("PORTCULLIS_E2E_README_TIMEOUT", "1800"))
ARTIFACTS = os.environ.get("PORTCULLIS_E2E_ARTIFACTS")


def skip_reason() -> str | None:
    """Why the cluster part cannot run here, or None when it can."""
    if os.environ.get("PORTCULLIS_E2E") != "1":
        return "cluster e2e: set PORTCULLIS_E2E=1 and give a kubeconfig to run against a real cluster"
    configured = os.environ.get("KUBECONFIG")
    paths = configured.split(os.pathsep) if configured else [str(Path.home() / ".kube" / "config")]
    if not any(Path(p).is_file() for p in paths if p):
        return f"cluster e2e: no kubeconfig found at {', '.join(paths)}"
    return None
