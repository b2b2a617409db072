# routheon-server: aggregated /v1/models, /stats and OpenAI error pages for Traefik.
# Built by docker-compose.yml; on its own:
#   docker build -t routheon-server .
#   docker run -v "$PWD/docker/mappings:/etc/traefik/mappings:ro" -p 127.0.0.1:9080:9080 routheon-server
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin routheon

USER 10001
EXPOSE 9080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9080/health', timeout=2)"]

# Inside a container it must listen on all interfaces for Traefik to reach it; the compose
# file publishes no port of it, so it stays reachable only from the stack's network.
ENTRYPOINT ["routheon-server"]
CMD ["--host", "0.0.0.0", "--port", "9080", "--mappings", "/etc/traefik/mappings"]
