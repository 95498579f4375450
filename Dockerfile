# Production image: runs `inventory serve` against external PostgreSQL and Redis.
#   docker build -t inventory .
#   docker run -e INVENTORY_DATABASE_URL=... -e INVENTORY_REDIS_URL=... \
#              -e INVENTORY_TOKENS='{"sha256:<hex>": ["admin"]}' -p 8000:8000 inventory
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    INVENTORY_HOST=0.0.0.0 INVENTORY_PORT=8000 INVENTORY_WORKERS=2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY inventory ./inventory
COPY realtime ./realtime
COPY locks ./locks
COPY bench ./bench
COPY loadtest ./loadtest
RUN pip install . && useradd --system --uid 10001 --home-dir /nonexistent inventory

USER inventory
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"

# External servers only: with both URLs set nothing embedded starts.
CMD ["inventory", "serve"]
