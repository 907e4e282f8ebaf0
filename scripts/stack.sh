#!/usr/bin/env bash
# The platform's topology natively, without Docker: a Prefect server, an MLflow server on
# PostgreSQL with its artifacts on the configured S3 endpoint, the deployments of
# prefect.yaml (`prefect deploy --all`) and a Prefect worker on the `vitsem` process pool.
# PostgreSQL must already run. Usage:
#   scripts/stack.sh up      # start, wait until healthy, deploy; prints the exports to use
#   scripts/stack.sh down    # stop the worker and the servers (SIGTERM, then SIGKILL)
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI      PostgreSQL URL of MLflow's database (required for up)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix of MLflow's artifacts (required for up)
#   AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY  the S3 endpoint and its user
#   VITSEM_STACK_DIR     pid files and logs (default ./vitsem-work/stack)
#   VITSEM_PREFECT_PORT  (default 4200)   VITSEM_MLFLOW_PORT (default 5000)
#   VITSEM_STACK_DEPLOY  deployment names to deploy, space separated (default: all)
#   VITSEM_* for the flows (VITSEM_DATABASE_URL, VITSEM_ARTIFACT_URI, ...): the worker's
#   flow runs inherit this environment. Binaries come from the PATH (or VITSEM_BIN).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${VITSEM_STACK_DIR:-$root/vitsem-work/stack}"
prefect_port="${VITSEM_PREFECT_PORT:-4200}"
mlflow_port="${VITSEM_MLFLOW_PORT:-5000}"
bin="${VITSEM_BIN:-$(dirname "$(command -v prefect)")}"
export PREFECT_API_URL="http://127.0.0.1:$prefect_port/api"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

start() {  # name, command...: its own process group, so `down` stops its children too
  local name="$1"; shift
  setsid "$@" >"$dir/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

wait_http() {  # name, url, seconds
  local name="$1" url="$2" deadline=$((SECONDS + $3))
  until "$bin/python" -c "import urllib.request as u; u.urlopen('$url', timeout=3)" 2>/dev/null; do
    if ! kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      echo "$name exited; its log ($dir/$name.log):" >&2; tail -30 "$dir/$name.log" >&2; exit 1
    fi
    if ((SECONDS > deadline)); then echo "$name not healthy at $url" >&2; exit 1; fi
    sleep 1
  done
}

stop_one() {  # name: SIGTERM to its group, SIGKILL after 15 s
  local pidfile="$dir/$1.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

up() {
  : "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (PostgreSQL URL of MLflow)}"
  : "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
  mkdir -p "$dir"
  start prefect-server "$bin/prefect" server start --host 127.0.0.1 --port "$prefect_port"
  start mlflow "$bin/mlflow" server --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts
  wait_http prefect-server "$PREFECT_API_URL/health" 180
  wait_http mlflow "http://127.0.0.1:$mlflow_port/health" 180
  "$bin/prefect" work-pool inspect vitsem >/dev/null 2>&1 \
    || "$bin/prefect" work-pool create vitsem --type process >/dev/null
  # The GPU pool (served by a worker on a GPU machine: `prefect worker start --pool
  # vitsem-gpu`) and the global limit every CUDA model pass holds a slot of.
  "$bin/prefect" work-pool inspect vitsem-gpu >/dev/null 2>&1 \
    || "$bin/prefect" work-pool create vitsem-gpu --type process >/dev/null
  "$bin/prefect" gcl inspect vitsem-gpu >/dev/null 2>&1 \
    || "$bin/prefect" gcl create vitsem-gpu --limit "${VITSEM_GPU_SLOTS:-1}" >/dev/null
  # prefect.yaml's pull step points at the image's /app; natively it is this checkout.
  sed "s#directory: /app#directory: $root#" "$root/prefect.yaml" >"$dir/prefect.yaml"
  local which=(--all)
  if [[ -n "${VITSEM_STACK_DEPLOY:-}" ]]; then
    which=(); for name in $VITSEM_STACK_DEPLOY; do which+=(--name "$name"); done
  fi
  (cd "$root" && "$bin/prefect" --no-prompt deploy "${which[@]}" --prefect-file "$dir/prefect.yaml") \
    >"$dir/deploy.log" 2>&1 || { tail -30 "$dir/deploy.log" >&2; exit 1; }
  export VITSEM_MLFLOW_TRACKING_URI="${VITSEM_MLFLOW_TRACKING_URI:-http://127.0.0.1:$mlflow_port}"
  start worker "$bin/prefect" worker start --pool vitsem --type process
  echo "export PREFECT_API_URL=$PREFECT_API_URL"
  echo "export VITSEM_MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port"
}

down() {
  stop_one worker
  stop_one mlflow
  stop_one prefect-server
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
