#!/usr/bin/env bash
# The main job end to end on bundled data (scikit-learn's digits, 10% of train labels flipped):
# train with the Diff-In callback, rank the most suspicious samples, verify a small coreset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
py=.venv/bin/python
run_dir="runs/quickstart/train"
rm -rf runs/quickstart
echo "== 1/3 training an MLP on digits (10% flipped labels) with DiffInCallback"
$py -m diffin_lightning.train experiment=digits_noisy "hydra.run.dir=$run_dir"
echo "   run: $run_dir ($(grep -o '"fit_seconds": [0-9.]*' "$run_dir/summary.json"))"
echo "== 2/3 data cleaning: self-influence ranking"
$py -m diffin_lightning.analyze task=clean "run_dir=$run_dir" "hydra.run.dir=runs/quickstart/clean"
echo "== 3/3 coreset: keep 30% / 50% per class by Diff-In on the validation loss, retrain over 2 seeds"
$py -m diffin_lightning.analyze task=coreset "run_dir=$run_dir" "p=[0.3,0.5]" "seeds=[0,1]" class_balanced=true target=val verify=true "hydra.run.dir=runs/quickstart/coreset"
echo
echo "Plots: runs/quickstart/clean/clean.png (score histogram and recall curve), runs/quickstart/coreset/coreset.png"
