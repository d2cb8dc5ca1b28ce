# syntax=docker/dockerfile:1
#
# One image for everything Portcullis runs in a cluster:
#   portcullis operator ...                      the chart's Deployment
#   portcullis gateway --in-cluster ...          the pods the operator creates per VirtualMCPServer
#   python examples/inbox/server.py --host 0.0.0.0   the example upstream (examples/cluster/inbox-upstream.yaml)
#
# Build: docker build -t portcullis:dev .   (multi-arch and published: .github/workflows/release.yaml)

# The base, pinned by digest so that a rebuild of one commit starts from the same bytes.
# This digest was copied from public documentation (an ADR dated 2026-08-24 that records it as
# verified against Docker Hub); it could NOT be checked against the registry when it was written
# here (no registry reachable). Before a release, and whenever you bump it, take the digest of the
# multi-arch index, not of one platform's manifest:
#   docker buildx imagetools inspect python:3.11-slim-bookworm      # the "Digest:" line at the top
# The release workflow refuses a base that is not an index holding linux/amd64 and linux/arm64.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# Optional extras of the package, e.g. --build-arg EXTRAS=tracing for OpenTelemetry traces.
ARG EXTRAS=""

# --- builder: the project as a wheel, and a wheel of every dependency -----------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG EXTRAS
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
# Binary wheels are preferred: every dependency publishes them for linux/amd64 and linux/arm64, so
# no compiler is installed here either, and a dependency that would need one fails this step by name.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip wheel --no-cache-dir --prefer-binary --wheel-dir /wheels "$(ls /wheels/portcullis-*.whl)${EXTRAS:+[$EXTRAS]}"

# --- final: the wheels installed into the same slim base, nothing else ----------------------------
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG EXTRAS
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/portcullis-dev/portcullis

LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="Virtual MCP servers on Kubernetes: the operator, the gateway and the example upstream in one image." \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.url="${SOURCE}" \
      org.opencontainers.image.documentation="${SOURCE}/tree/main/docs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Portcullis maintainers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The wheels are bind-mounted from the builder, not copied: they never become a layer of this image.
# Installed from them alone (--no-index), so what runs is exactly what the builder resolved. Then the
# installers themselves go (pip, setuptools, wheel): nothing installs at run time, and what is not
# there needs no patching.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "portcullis${EXTRAS:+[$EXTRAS]}" \
    && python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 portcullis \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin portcullis

# The example upstreams (the inbox a cluster quickstart calls, the conformance fixture), owned by
# root and only readable by the runtime user.
COPY examples /opt/portcullis/examples

# Numeric, so the kubelet can check runAsNonRoot; the same uid the chart and the gateway pods set.
USER 10001:10001
WORKDIR /opt/portcullis

# Agent port, admin port, metrics (the gateway); the operator serves 8080 (health) and 9090 too.
EXPOSE 8080 8081 9090

ENTRYPOINT ["portcullis"]
CMD ["--help"]
