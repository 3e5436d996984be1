#!/usr/bin/env bash
# The device checks in one run, for a machine with CUDA (CI never has one): the GPU tests, then the
# overhead benchmark with CUDA synchronisation. Everything lands under $OUT (default runs/gpu_check):
# device.txt, gpu_tests.txt, overhead_gpu.md (every workload's table), overhead_gpu.log and, with BF16_WORKLOADS / FLOOR_WORKLOADS, overhead_bf16_gpu.md / floor_gpu.md. Needs torch, lightning, torchmetrics,
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
# The issue's GPU-sized workloads, one invocation each so that a run stopped at its time limit keeps
# what finished; their tables are appended to one file and their logs to another (a device call
# returns at most 8 files). REPEATS defaults to 1: each fit is a fresh process (CUDA and Lightning
# start-up, a warm-up fit), and on an H100 the four workloads took about 8 minutes at 2 repeats for
# the MLP and CNN and 1 for the others, most of a 10-minute call.
repeats="${REPEATS:-1}"
: > "$out/overhead_gpu.md"
for workload in ${WORKLOADS-mlp_gpu cnn_gpu transformer_gpu gpt2_gpu}; do  # WORKLOADS="" runs none
    breakdown=()
    [ "$workload" = mlp_gpu ] && breakdown=(--breakdown mlp_gpu)
    # The attention models' step is bound by the host issuing operations: also the refresh in one batch.
    lever=()
    case "$workload" in transformer_gpu|gpt2_gpu) lever=("first order, target in one batch of 1,024 (GPU lever)");; esac
    "$py" -m benchmarks.overhead --device cuda --repeats "$repeats" --epochs 4 --workloads "$workload" \
        --settings "first order (defaults)" "Diff-In (defaults)" "Diff-In, every 10 steps" "${lever[@]}" "${breakdown[@]}" \
        --out "$out/one_workload.md" >> "$out/overhead_gpu.log" 2>&1
    echo "overhead $workload rc $?" >> "$out/overhead_gpu.log"
    [ -f "$out/one_workload.md" ] && cat "$out/one_workload.md" >> "$out/overhead_gpu.md" && rm -f "$out/one_workload.md"
done
# Optional (BF16_WORKLOADS="mlp_gpu ..."): the same under bf16-mixed, first order reading the step's own bfloat16
# captures beside the full-precision recomputation it replaces, into overhead_bf16_gpu.md.
if [ -n "${BF16_WORKLOADS:-}" ]; then
    "$py" -m benchmarks.overhead --device cuda --repeats "$repeats" --epochs 4 --workloads ${BF16_WORKLOADS} --precision bf16-mixed \
        --settings "first order (defaults)" "first order, recomputed per step" "Diff-In (defaults)" \
        --out "$out/overhead_bf16_gpu.md" >> "$out/overhead_gpu.log" 2>&1
    echo "overhead bf16-mixed rc $?" >> "$out/overhead_gpu.log"
fi
# Optional (FLOOR_WORKLOADS="mlp_gpu ...", default none: the checks above take most of a 10-minute call): each
# setting's arithmetic floor beside the callback, in one process (benchmarks/floor.py), into floor_gpu.md.
if [ -n "${FLOOR_WORKLOADS:-}" ]; then
    "$py" -m benchmarks.floor --device cuda --repeats "${FLOOR_REPEATS:-3}" --workloads ${FLOOR_WORKLOADS} --bfloat16 \
        --out "$out/floor_gpu.md" >> "$out/overhead_gpu.log" 2>&1
    echo "floor rc $?" >> "$out/overhead_gpu.log"
fi
tail -n 3 "$out/gpu_tests.txt"; grep -E "^(overhead .*|floor) rc" "$out/overhead_gpu.log"
