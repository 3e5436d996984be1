#!/usr/bin/env bash
# One command for the fidelity benchmark from a fresh clone: set up .venv with the benchmark
# extra (Captum, for the TracInCP row; kronfluence, for the EK-FAC row), then write benchmarks/results/fidelity.md and the
# scatter plots (about 9 minutes on 2 CPU cores). Extra arguments go to benchmarks.fidelity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[bench]"
# kronfluence without its torchvision requirement (see pyproject.toml's bench extra).
.venv/bin/python -m pip install -q --no-deps "kronfluence==1.0.1"
exec .venv/bin/python -m benchmarks.fidelity "$@"
