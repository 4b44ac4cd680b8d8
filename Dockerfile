# One image for every process of the stack; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# git for session workspaces; Node.js and npm for the OpenCode server the opencode executor drives;
# bubblewrap and socat for the sandbox agent processes run in (docs/SECURITY.md).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git nodejs npm bubblewrap socat \
    && rm -rf /var/lib/apt/lists/*
# Requirements first, so a code change does not reinstall them.
COPY requirements.txt .
RUN pip install --require-hashes -r requirements.txt
COPY package.json package-lock.json ./
RUN npm install --no-audit --no-fund --loglevel=error && node_modules/.bin/opencode --version

COPY . .
# DEBUG only for this build step: collectstatic needs settings, not a SECRET_KEY or a database.
RUN DEBUG=true python manage.py collectstatic --noinput -v0 \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /app/workspaces \
    && chown app /app/workspaces

# Celery refuses to run as root without a warning, and nothing here needs root.
USER app
EXPOSE 8000 5555
CMD ["gunicorn", "--config", "gunicorn.conf.py", "orchestrator_project.wsgi", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4", "--access-logfile", "-", "--no-control-socket"]
