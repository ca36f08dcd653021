#!/usr/bin/env bash
# The test command: installs everything it needs (venv, native build, test dependencies), runs the
# whole suite, then the fallback path in a fresh venv (tools/test_fallback_env.sh). Extra arguments
# go to pytest and skip the fallback run (a developer narrowing the suite wants just that).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/setup_env.sh"
cd "$root"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
if [ $# -eq 0 ]; then
  "$root/tools/test_fallback_env.sh"
fi
