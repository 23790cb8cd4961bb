#!/bin/sh
# The one entry point of the PEL Tune images (deploy/Dockerfile), docker-compose.yml and deploy/k8s, also run by
# tests/deploy/test_entrypoint.py from a checkout:
#
#   entrypoint.sh api       serve the REST API (uvicorn) on 0.0.0.0:${PELTUNE_API_PORT:-8000}
#   entrypoint.sh worker    a Celery worker (solo pool, one job at a time; the training stack must be installed)
#   entrypoint.sh migrate   alembic upgrade head on PELTUNE_DATABASE_URL, then exit
#   entrypoint.sh CMD ...   run CMD as is (a shell, `celery inspect`, ...)
#
# The service commands are api/cli.py's (`pel-tune api|worker|migrate`), run from the source folder this script
# sits in, so a checkout and the image run the same code the same way. `exec` all the way down: the service is
# the container's PID 1 and gets SIGTERM itself (uvicorn drains requests; Celery shuts down warm).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PELTUNE_PYTHON:-python}

case "${1:-api}" in
  api)
    [ "$#" -gt 0 ] && shift
    # uvicorn logs its first lines before the app configures logging (api/logs.py): JSON from the first line.
    if [ "${PELTUNE_LOG_FORMAT:-json}" = json ]; then
      export UVICORN_LOG_CONFIG="${UVICORN_LOG_CONFIG:-$ROOT/deploy/uvicorn-logging.json}"
    fi
    exec "$PYTHON" -m api.cli api --host "${PELTUNE_API_HOST:-0.0.0.0}" --port "${PELTUNE_API_PORT:-8000}" "$@"
    ;;
  worker | migrate)
    command=$1
    shift
    exec "$PYTHON" -m api.cli "$command" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
