#!/usr/bin/env bash
# The test command: installs everything it needs (venv, native build, test dependencies) and runs
# the whole suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
