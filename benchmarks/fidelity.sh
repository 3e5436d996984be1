#!/usr/bin/env bash
# One command for the fidelity benchmark from a fresh clone: set up .venv with the benchmark
# extra (Captum, for the TracInCP row), then write benchmarks/results/fidelity.md and the
# scatter plots (about 9 minutes on 2 CPU cores). Extra arguments go to benchmarks.fidelity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python -m pip install -q -e ".[bench]"
exec .venv/bin/python -m benchmarks.fidelity "$@"
