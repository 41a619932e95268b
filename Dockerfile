# agentpost server image: `agentpost serve` (gRPC server, and the arq worker unless --no-worker).
# Without AGENTPOST_REDIS_URL it starts an embedded Redis-compatible server; docker-compose.yml
# points it at a real Redis instead and runs the worker as its own service.

# --- build: install the package and its server extra into a self-contained venv -------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
WORKDIR /src
# Only what the wheel is built from (see [tool.hatch.build] in pyproject.toml).
COPY pyproject.toml README.md ./
COPY client/ client/
COPY server/ server/
RUN /opt/venv/bin/pip install ".[server]"

# --- runtime ---------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system agentpost \
    && useradd --system --gid agentpost --create-home --home-dir /home/agentpost agentpost
COPY --from=build /opt/venv /opt/venv

USER agentpost
# Writable by the service user: the embedded Redis (no AGENTPOST_REDIS_URL) keeps its files here.
WORKDIR /home/agentpost

EXPOSE 50051

# grpc.health.v1 with the empty service name: SERVING once the server accepts calls. The worker
# serves no gRPC: docker-compose.yml disables this check for it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; r = hg.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]

# Without TLS (AGENTPOST_TLS_CERT/_KEY) or AGENTPOST_PLAINTEXT=true the server refuses to start:
# docker-compose.yml sets the flag for development.
# Exec form: agentpost is PID 1 and gets SIGTERM itself, so it drains its sessions on `docker stop`.
CMD ["agentpost", "serve", "--listen", "0.0.0.0:50051"]
