# mqtt-site-exporter container image.
#
#   docker build -t mqtt-site-exporter .
#   docker run --rm -p 8000:8000 -e MQTT_INSTANCE_ID=prod-1 \
#     -v "$PWD/sites.yml:/etc/mqtt-site-exporter/sites.yml:ro" \
#     -v mqtt-site-exporter-state:/var/lib/mqtt-site-exporter mqtt-site-exporter
#
# Stage 1 builds wheels (the package and its dependencies) from the repository;
# stage 2 installs only those wheels, offline, into a clean slim image.
# Works with the classic builder and with BuildKit (no RUN --mount).

FROM python:3.11.10-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Exactly what setup.cfg needs: metadata, README (long_description) and the package.
COPY pyproject.toml setup.cfg README.md ./
COPY exporter/ exporter/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .


FROM python:3.11.10-slim-bookworm

# Keep in step with exporter.__version__ (tests/test_stack.py checks it).
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="mqtt-site-exporter" \
      org.opencontainers.image.description="One supervised MQTT connection per site, visible to Prometheus" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.10-slim-bookworm"

# MQTT_STATE_DIR keeps the shutdown history across restarts: it must be a persistent
# volume (see VOLUME below). Every other MQTT_* setting keeps its default (docs/configuration.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MQTT_SITES_FILE=/etc/mqtt-site-exporter/sites.yml \
    MQTT_STATE_DIR=/var/lib/mqtt-site-exporter \
    EXPORTER_LISTEN=0.0.0.0:8000

COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels \
        /tmp/wheels/mqtt_site_exporter-*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin exporter \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/mqtt-site-exporter \
    && install -d -m 0755 /etc/mqtt-site-exporter

# The sites file is mounted here; a relative MQTT_SITES_FILE and a .env file are
# looked up in this directory too.
WORKDIR /etc/mqtt-site-exporter

# Declared after the chown so a new named volume starts out owned by 10001.
VOLUME ["/var/lib/mqtt-site-exporter"]

USER 10001:10001

EXPOSE 8000

# The exporter installs its SIGTERM handler itself (also as PID 1) and exits 0 well
# inside MQTT_SHUTDOWN_TIMEOUT; give the container a grace period above that.
STOPSIGNAL SIGTERM

# /health answers 200 for healthy and degraded, 503 for critical (no site connected,
# or shutting down). The port follows EXPORTER_LISTEN; a wildcard host means loopback.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; h, _, p = os.environ.get('EXPORTER_LISTEN', '0.0.0.0:8000').rpartition(':'); h = '127.0.0.1' if h in ('', '0.0.0.0', '::', '[::]') else h; sys.exit(0 if u.urlopen(f'http://{h}:{p or 8000}/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["mqtt-site-exporter"]
CMD ["run"]
