#!/usr/bin/env bash
# Cleaning digits with 10% flipped labels: train with the callback, then rank suspects by
# self-influence and by influence on the validation loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python -m diffin_lightning.train experiment=digits_noisy hydra.run.dir=runs/examples/clean_digits
.venv/bin/python -m diffin_lightning.analyze task=clean run_dir=runs/examples/clean_digits target=self hydra.run.dir=runs/examples/clean_digits/clean_self
.venv/bin/python -m diffin_lightning.analyze task=clean run_dir=runs/examples/clean_digits target=val hydra.run.dir=runs/examples/clean_digits/clean_val
