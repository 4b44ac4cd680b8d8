#!/usr/bin/env bash
# Start the whole stack in the foreground (honcho runs the Procfile); Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" PYTHONUNBUFFERED=1
if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
  FLOWER_BASIC_AUTH="admin:$(python -c 'import secrets; print(secrets.token_urlsafe(12))')"
  echo "FLOWER_BASIC_AUTH was unset; Flower's login for this run is: $FLOWER_BASIC_AUTH"
fi
export FLOWER_BASIC_AUTH
python manage.py migrate --noinput -v0
python manage.py collectstatic --noinput -v0
echo "Console http://127.0.0.1:${WEB_PORT:-8000}/console/  API /api/v1/  docs /api/docs/  admin /admin/  event streams http://127.0.0.1:${STREAM_PORT:-8001}/  Flower http://127.0.0.1:${FLOWER_PORT:-5555}/  Prometheus http://127.0.0.1:9090/ (if installed)"
exec honcho start -f "${PROCFILE:-Procfile}"
