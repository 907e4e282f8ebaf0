#!/usr/bin/env bash
# Lint (ruff), type-check (mypy) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/bootstrap.sh")"
cd "$root"
"$venv/bin/ruff" check vitsem flows tests bench
"$venv/bin/mypy"
exec "$venv/bin/python" -m pytest "$@"
