#!/usr/bin/env bash
# Create or refresh the project's virtual environment; prints its path on stdout.
# The venv is rebuilt only when pyproject.toml changes (its hash is stamped inside).
# VITSEM_VENV overrides the location (default: .venv in the repository).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VITSEM_VENV:-$root/.venv}"
stamp="$venv/.vitsem-stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  echo "$venv"
  exit 0
fi
py="$(command -v python3.11 || command -v python3)"
log="$(mktemp -t vitsem-bootstrap.XXXXXX.log)"
echo "bootstrapping $venv with $py (first run installs torch; a few minutes; log: $log)" >&2
"$py" -m venv "$venv"
{
  "$venv/bin/python" -m pip install --upgrade pip &&
  # torch first, pinned to the releases on the project machines' disk: an unpinned torch
  # would download a multi-GB build.
  "$venv/bin/python" -m pip install torch==2.14.1 torchvision==0.29.1 &&
  "$venv/bin/python" -m pip install -e "$root[dev]"
} >"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "bootstrap failed; see $log" >&2; exit 1; }
echo "$want" >"$stamp"
echo "$venv"
