#!/usr/bin/env bash
# The main job on its embedded defaults: `vitsem demo` runs the whole pipeline through the
# Prefect flows (shipped benchmark, a tiny ViT trained once, SIFT extraction, attention
# analysis) on SQLite, a local artifact folder, a local MLflow store and Prefect's ephemeral
# API, all under $VITSEM_HOME (default ./vitsem-work). Extra arguments go to `vitsem demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/bootstrap.sh")"
cd "$root"
exec "$venv/bin/vitsem" demo "$@"
