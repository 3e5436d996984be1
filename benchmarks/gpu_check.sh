#!/usr/bin/env bash
# The device checks in one run, for a machine with CUDA (CI never has one): the GPU tests, then the
# overhead benchmark with CUDA synchronisation. Everything lands under $OUT (default runs/gpu_check):
# device.txt, gpu_tests.txt, overhead_cuda.md and its log. Needs torch, lightning, torchmetrics,
# safetensors, scikit-learn and pytest (no hydra-core: neither the GPU tests nor the benchmark import it;
# pytest from carried wheels where missing, see below).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_check}"
py="${PYTHON:-python}"  # the interpreter that has torch (the device machine: python)
mkdir -p "$out"
"$py" - > "$out/device.txt" 2>&1 <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here (see $out/device.txt); nothing run." >&2
    exit 1
fi
# A device machine may lack pytest (it has no network): carry wheels fetched here beforehand with
# `pip download pytest -d .wheels` (and name .wheels in the run's carry); they are installed offline.
if ! "$py" -c "import pytest" 2>/dev/null && [ -d .wheels ]; then
    "$py" -m pip install -q --no-index --find-links .wheels pytest > "$out/pip.txt" 2>&1
fi
"$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py > "$out/gpu_tests.txt" 2>&1
echo "pytest rc $?" >> "$out/gpu_tests.txt"
"$py" -m benchmarks.overhead --device cuda --repeats 3 --epochs 4 --workloads mlp cnn transformer --breakdown mlp \
    --out "$out/overhead_cuda.md" > "$out/overhead_cuda.log" 2>&1
echo "overhead rc $?" >> "$out/overhead_cuda.log"
tail -n 3 "$out/gpu_tests.txt" "$out/overhead_cuda.log"
