#!/usr/bin/env bash
# The test command: set up .venv, then run the default suite (slow and GPU tests excluded
# or skipped; `-m slow` selects the slow ones). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
exec .venv/bin/python -m pytest -q "$@"
