"""ATen operations dispatched per optimizer step, with and without the callback (what a GPU's host issues).

    python -m benchmarks.op_census [--workload transformer_gpu] [--epochs 1] [--settings ...] [--top 0]

On a GPU a small model's step is bound by the host issuing operations, not by their arithmetic:
this counts them (a ``TorchDispatchMode`` around one fit on the CPU, so it needs no GPU) per
setting of ``benchmarks.overhead``. The count includes everything in the fit: the callback's
first-step check and its end-of-fit pass too, which a longer fit spreads over more steps.
``--top N`` also lists the N library lines that issue the most operations (slower: a stack
walk per operation).
"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.overhead import SETTINGS, fit_once, workloads


class _Census(TorchDispatchMode):
    def __init__(self, by_line: bool) -> None:
        super().__init__()
        self.count, self.by_line = 0, by_line
        self.lines: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if self.by_line:
            frames = [f for f in traceback.extract_stack() if "/diffin_lightning/" in f.filename and "/bundled/" not in f.filename]
            where = f"{frames[-1].filename.split('/diffin_lightning/')[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "(outside the library)"
            self.lines[where] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="transformer_gpu", choices=list(workloads()))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=["first order (defaults)", "Diff-In (defaults)", "Diff-In, every 10 steps"], choices=list(SETTINGS))
    parser.add_argument("--top", type=int, default=0, help="list the library lines issuing the most operations")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = workloads()[args.workload]
    data = workload[1]()
    data.setup("fit")
    steps = args.epochs * len(data.train_dataloader())
    print(f"{workload[0]}, {args.epochs} epoch(s) = {steps} optimizer steps")
    print("| setting | ATen ops in the fit | per step | more than plain, per step |")
    print("| --- | ---: | ---: | ---: |")
    plain = None
    for name in ["plain", *args.settings]:
        census = _Census(by_line=args.top > 0 and name != "plain")
        with census:
            fit_once(workload, "cpu", args.epochs, None if name == "plain" else SETTINGS[name])
        per_step = census.count / steps
        plain = per_step if plain is None else plain
        print(f"| {name} | {census.count} | {per_step:.0f} | {per_step - plain:+.0f} |", flush=True)
        for where, count in census.lines.most_common(args.top):
            print(f"|   {where} | {count} | {count / steps:.0f} | |")


if __name__ == "__main__":
    main()
