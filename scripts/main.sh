#!/usr/bin/env bash
# The main job on its embedded defaults: `vitsem analyze` on the shipped shortcut benchmark
# with a tiny ViT it trains once (cached under $VITSEM_HOME, default ./vitsem-work).
# Extra arguments go to `vitsem analyze`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/bootstrap.sh")"
cd "$root"
exec "$venv/bin/vitsem" analyze "$@"
