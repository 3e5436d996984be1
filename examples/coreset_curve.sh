#!/usr/bin/env bash
# A coreset curve on digits: test accuracy against the fraction kept, Diff-In versus random,
# EL2N and forgetting counts, three seeds. Plot: runs/examples/coreset_curve/coreset/coreset.png
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python -m diffin_lightning.train hydra.run.dir=runs/examples/coreset_curve
.venv/bin/python -m diffin_lightning.analyze task=coreset run_dir=runs/examples/coreset_curve target=val class_balanced=true \
  "p=[0.1,0.2,0.3,0.5,0.7]" "seeds=[0,1,2]" verify=true hydra.run.dir=runs/examples/coreset_curve/coreset
