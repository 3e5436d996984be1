"""Where a recorded step's extra time goes: milliseconds per step in each part of the callback, exclusive of nested parts.

    python -m benchmarks.step_parts --workload cnn --setting "first order (defaults)" [--repeats 3] [--threads 2]

Wraps the callback's hooks and the functions below them with wall-clock timers (exclusive: a
part's time leaves out the timed parts it calls), runs ``repeats`` pairs of a plain and a
callback 4-epoch fit in this process after a 1-epoch warm-up of each, and prints the pair with
the median ratio: the plain step, the callback's extra time per step, each part's share of it,
and what no timer saw (Lightning's own work around the hooks, the capture's backward hooks,
garbage). Finer than ``benchmarks.overhead --breakdown`` (which groups by estimator part): this
one names the functions, for work on the per-step path. On the CPU no synchronisation is needed;
do not read GPU timings from it.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from typing import Any

import torch

from benchmarks.overhead import SETTINGS, fit_once, workloads


def _timers() -> tuple[dict[str, float], dict[str, int], list[tuple[Any, str, Any]]]:
    from diffin_lightning import accumulator, callback, engine, recorder, targets
    from diffin_lightning.dots import capture, per_sample_dots

    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    stack: list[str] = []
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original = owner.__dict__.get(name)
        if original is None or isinstance(original, staticmethod):  # inherited no-ops; static backward hooks (untimed)
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            stack.append(label)
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                stack.pop()
                seconds[label] += elapsed
                calls[label] += 1
                if stack:
                    seconds[stack[-1]] -= elapsed

        patched.append((owner, name, original))
        setattr(owner, name, timed)

    for hook in ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad", "on_train_batch_end"):
        wrap(callback.DiffInCallback, hook, f"callback.{hook}")
    wrap(targets.DatasetTarget, "_refresh", "target gradient (refresh)")
    wrap(recorder.InfluenceRecorder, "_product_stream", "recorder._product_stream (the stream's set-up)")
    wrap(recorder.InfluenceRecorder, "_early_passes", "recorder._early_passes (set-up of the perturbed passes)")
    wrap(recorder.InfluenceRecorder, "record_step", "recorder.record_step")
    wrap(recorder.InfluenceRecorder, "_record_step", "recorder._record_step")
    wrap(recorder.InfluenceRecorder, "_device_gates", "recorder._device_gates (finiteness on the device)")
    wrap(recorder.InfluenceRecorder, "_accumulate_step", "recorder._accumulate_step")
    wrap(recorder.InfluenceRecorder, "compute_drift", "end-of-fit pass")
    wrap(capture.LayerCapture, "_on_forward", "capture forward hooks")
    wrap(capture.LayerCapture, "per_sample", "capture.per_sample (the step's per-sample view)")
    wrap(engine.CapturedStep, "_streamed_perturbed_along", "perturbed pass (forward and backward at theta + eps u)")
    wrap(engine.ScaledShift, "add_to", "parameter shift")
    wrap(per_sample_dots.PerSampleDots, "dots", "per-sample products <V, G_i>")
    wrap(per_sample_dots.PerSampleDots, "gradient_dots", "f_i = <G_sum, G_i>")
    wrap(accumulator.InfluenceAccumulator, "add", "accumulator.add")
    return seconds, calls, patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cnn", choices=list(workloads()))
    parser.add_argument("--setting", default="first order (defaults)", choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload, setting = workloads()[args.workload], SETTINGS[args.setting]
    seconds, calls, patched = _timers()
    try:
        fit_once(workload, "cpu", 1, setting)
        fit_once(workload, "cpu", 1, None)
        pairs = []
        for _ in range(args.repeats):
            seconds.clear()
            calls.clear()
            plain = fit_once(workload, "cpu", args.epochs, None)["wall"]
            with_callback = fit_once(workload, "cpu", args.epochs, setting)["wall"]
            pairs.append((with_callback / plain, plain, with_callback, dict(seconds), dict(calls)))
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    ratio, plain, with_callback, parts, counts = sorted(pairs, key=lambda pair: pair[0])[len(pairs) // 2]
    steps = max(counts.get("callback.on_before_optimizer_step", 1), 1)
    extra = with_callback - plain
    print(f"{workload[0]}, {args.setting}, {args.epochs} epochs, {steps} steps (the median of {args.repeats} pairs by ratio)")
    print(f"plain {plain:.3f} s ({1e3 * plain / steps:.2f} ms/step); with the callback {with_callback:.3f} s (ratio {ratio:.2f}); extra {1e3 * extra / steps:.2f} ms/step")
    print("| part (exclusive) | ms/step | calls | share of the extra |")
    print("| --- | ---: | ---: | ---: |")
    for label, value in sorted(parts.items(), key=lambda item: -item[1]):
        if value * 1e3 / steps >= 0.005:
            print(f"| {label} | {1e3 * value / steps:.3f} | {counts[label]} | {100 * value / extra:.0f}% |")
    print(f"| not timed (Lightning around the hooks, backward hooks, timers) | {1e3 * (extra - sum(parts.values())) / steps:.3f} | | |")


if __name__ == "__main__":
    main()
