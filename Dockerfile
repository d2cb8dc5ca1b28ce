# One image for the operator and the gateways it deploys: `portcullis operator`, `portcullis gateway`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install . && rm -rf /src

# The example upstream (an inbox-like MCP server) rides along so a cluster can run the same
# story as `portcullis demo`; the e2e suite starts it from this image.
COPY examples /opt/portcullis/examples

# Non-root, matching the uid the chart and the gateway pods run as.
RUN groupadd --gid 10001 portcullis \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin portcullis
USER 10001:10001
WORKDIR /

ENTRYPOINT ["portcullis"]
