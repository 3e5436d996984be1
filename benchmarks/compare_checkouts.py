"""Wall-time ratio of one workload and setting under two checkouts, fits alternating in fresh processes.

    git worktree add /tmp/old <commit>
    python -m benchmarks.compare_checkouts /tmp/old . --workload cnn --setting "first order (defaults)" --repeats 5

Each checkout runs in its own process (its own `benchmarks` and `diffin_lightning` first on
the path): a 1-epoch warm-up, then ``repeats`` pairs of plain and callback 4-epoch fits
(``benchmarks.overhead.fit_once``); the median of the per-pair ratios is printed. The checkouts
alternate, ``rounds`` times, so that load drifting on a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

_ONE = """
import sys, statistics
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from benchmarks.overhead import workloads, fit_once, SETTINGS
workload, setting = workloads()[{workload!r}], SETTINGS[{setting!r}]
fit_once(workload, "cpu", 1, setting)
ratios = []
for _ in range({repeats}):
    plain = fit_once(workload, "cpu", {epochs}, None)["wall"]
    ratios.append(fit_once(workload, "cpu", {epochs}, setting)["wall"] / plain)
print(statistics.median(ratios))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", nargs=2, help="two source trees (e.g. a git worktree of the old commit, and .)")
    parser.add_argument("--workload", default="cnn")
    parser.add_argument("--setting", default="first order (defaults)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for round_ in range(args.rounds):
        for checkout in args.checkouts:
            root = str(Path(checkout).resolve())
            code = _ONE.format(
                root=root, threads=args.threads, workload=args.workload, setting=args.setting, repeats=args.repeats, epochs=args.epochs
            )
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
            ratio = float(result.stdout.strip().splitlines()[-1])
            print(f"round {round_ + 1}: {root}: {args.workload}, {args.setting}: median wall ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
