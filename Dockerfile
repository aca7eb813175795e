# syntax=docker/dockerfile:1
# falgate: build a wheel set in one stage, run it as an unprivileged user in a slim one.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN python -m venv /opt/falgate \
 && /opt/falgate/bin/pip install --upgrade pip \
 && /opt/falgate/bin/pip install .

FROM python:3.11-slim AS runtime
ENV PATH=/opt/falgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FALGATE_HOST=0.0.0.0 \
    FALGATE_PORT=8000 \
    FALGATE_DATA_DIR=/var/lib/falgate
RUN groupadd --system --gid 10001 falgate \
 && useradd --system --uid 10001 --gid falgate --home-dir /var/lib/falgate \
      --shell /usr/sbin/nologin falgate \
 && mkdir -p /var/lib/falgate \
 && chown falgate:falgate /var/lib/falgate
COPY --from=build /opt/falgate /opt/falgate
USER 10001:10001
WORKDIR /var/lib/falgate
VOLUME ["/var/lib/falgate"]
EXPOSE 8000
# curl is not in the slim image; python is.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FALGATE_PORT', '8000'), timeout=2)"]
# uvicorn gets SIGTERM and drains for FALGATE_SHUTDOWN_GRACE_S before exiting.
STOPSIGNAL SIGTERM
CMD ["falgate", "serve"]
