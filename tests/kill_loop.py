"""The kill-loop: train, SIGKILL at random points (mid-write included), resume, repeat; then check.

    python tests/kill_loop.py <work_dir> [--kills 30] [--seed 0]

Prints one JSON line with what happened. Everything heavy is imported once here, and each
training life is a forked child (a fresh interpreter per life would spend most of the test
importing torch). This process itself runs no torch op before forking, so the children's
thread pools start clean.

A life resumes from the newest checkpoint (step-based every 7 steps, or epoch-end at steps 15 and 30, whichever
has the higher step) and writes the influence files with every checkpoint. After every kill a
verifier child loads every influence file and every checkpoint. At the end one life runs to
completion and its scores are compared (float64) with a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))

import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from diffin_lightning import DiffInCallback, EpochSeededSampler, IndexedDataset, ResumableDataLoader, load_influence  # noqa: E402
from helpers import TinyClassifier, TinyData, trainer  # noqa: E402

NUM_TRAIN, BATCH, EPOCHS = 3000, 200, 2  # 15 steps per epoch, 30 in all; N large enough that a write takes a moment
COMPONENTS = ("first_order", "second_order", "diffin", "visits")


def newest_checkpoint(directory: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in directory.glob("*.ckpt") if (m := re.match(r"(\d+)-(step|epoch)\.ckpt$", p.name))]
    return max(found)[1] if found else None


def train_once(run_dir: Path, checkpoints: bool) -> None:
    warnings.filterwarnings("ignore")
    data = TinyData.make(num_train=NUM_TRAIN, num_val=50, seed=0)
    indexed = IndexedDataset(data.train)
    loader = ResumableDataLoader(indexed, batch_size=BATCH, sampler=EpochSeededSampler(len(indexed), seed=0))
    callback = DiffInCallback(
        targets={"val": data.val, "train": "train", "self": "self"}, eps=1e-6, save_on_checkpoint=checkpoints, output_dir=run_dir / "scores"
    )
    callbacks: list = [callback]
    if checkpoints:
        callbacks += [
            ModelCheckpoint(dirpath=run_dir / "ckpt", filename="{step}-step", every_n_train_steps=7, save_top_k=-1, auto_insert_metric_name=False),
            ModelCheckpoint(dirpath=run_dir / "ckpt", filename="{step}-epoch", every_n_epochs=1, save_top_k=-1, auto_insert_metric_name=False),
        ]
    resume = newest_checkpoint(run_dir / "ckpt") if checkpoints else None
    trainer(default_root_dir=run_dir, max_epochs=EPOCHS, enable_checkpointing=checkpoints, callbacks=callbacks).fit(
        TinyClassifier().double(), loader, ckpt_path=resume
    )


def verify(run_dir: Path) -> None:
    """Exit 0 if every influence file pair and every checkpoint loads, else print why and exit 1."""
    problems = []
    if (run_dir / "scores" / "influence.json").exists() or (run_dir / "scores" / "influence.safetensors").exists():
        try:
            load_influence(run_dir / "scores")
        except Exception as error:  # noqa: BLE001 - reported, the parent decides
            problems.append(f"influence: {type(error).__name__}: {error}")
    for checkpoint in sorted((run_dir / "ckpt").glob("*.ckpt")):
        try:
            torch.load(checkpoint, weights_only=True)
        except Exception as error:  # noqa: BLE001
            problems.append(f"{checkpoint.name}: {type(error).__name__}: {str(error)[:200]}")
    print(json.dumps(problems))
    sys.exit(1 if problems else 0)


def compare(reference_dir: Path, run_dir: Path) -> None:
    """Print the largest relative difference of the final scores from the uninterrupted run's; exit 1 if not allclose."""
    reference, final = load_influence(reference_dir / "scores"), load_influence(run_dir / "scores")
    worst, close = 0.0, final.metadata.get("complete") is True
    for name in reference:
        for component in COMPONENTS:
            expected, actual = reference[name].component(component), final[name].component(component)
            close &= bool(torch.allclose(actual, expected, rtol=1e-9, atol=1e-12))
            worst = max(worst, float(((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max()))
    print(json.dumps({"allclose": close, "max_relative_difference": worst, "steps_recorded": final.metadata["steps_recorded"]}))
    sys.exit(0 if close else 1)


def fork(function, *args, quiet: bool = True) -> tuple[int, int]:
    """Run ``function(*args)`` in a forked child; returns (pid, read end of its stdout)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 1)
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        try:
            function(*args)
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        except BaseException:  # noqa: BLE001
            code = 3
        sys.stdout.flush()
        os._exit(code)
    os.close(write)
    return pid, read


def wait(pid: int, read: int, status: int | None = None) -> tuple[int, str]:
    """The child's exit code and output; ``status`` when it was already reaped."""
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    if status is None:
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def temporaries(run_dir: Path, pid: int | None = None) -> list[str]:
    """Temporary files in the run's directories; with ``pid``, only those that process is writing now."""
    names = []
    for directory in (run_dir / "scores", run_dir / "ckpt"):
        try:
            names += [entry.name for entry in os.scandir(directory) if ".tmp" in entry.name]
        except FileNotFoundError:
            pass
    if pid is not None:
        names = [name for name in names if f".{pid}." in name]
    return names


def pending_metadata(run_dir: Path, since: float) -> bool:
    """True between the pending metadata's arrival and its rename (in this life, written after ``since``,
    a wall-clock time): a kill now splits the two-file write."""
    try:
        return (run_dir / "scores" / ".influence.json.pending").stat().st_mtime >= since
    except FileNotFoundError:
        return False


def main() -> None:
    work = Path(sys.argv[1])
    kills = int(sys.argv[sys.argv.index("--kills") + 1]) if "--kills" in sys.argv else 30
    rng = random.Random(int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0)
    started = time.perf_counter()

    code, _ = wait(*fork(train_once, work / "reference", False))
    assert code == 0, "the uninterrupted reference run failed"
    reference_seconds = time.perf_counter() - started

    records, lineages = [], []
    while len(records) < kills:
        # One lineage: lives killed at random until one finishes; then its scores are compared.
        run_dir = work / f"killed_{len(lineages)}"
        lineage_kills = 0
        while True:
            mode = rng.choice(["random", "random", "on_write"])
            delay = rng.uniform(0.0, reference_seconds / 2)
            pid, read = fork(train_once, run_dir, True)
            life_start, life_wall = time.perf_counter(), time.time()
            seen: list[str] = []
            status = None
            while True:
                elapsed = time.perf_counter() - life_start
                if mode == "on_write":
                    seen = temporaries(run_dir, pid)
                    if seen or pending_metadata(run_dir, life_wall) or elapsed > reference_seconds:
                        break
                    time.sleep(0.0005)
                else:
                    if elapsed >= delay:
                        seen = temporaries(run_dir, pid)
                        break
                    time.sleep(0.005)
                finished, status = os.waitpid(pid, os.WNOHANG)
                if finished:
                    break
                status = None
            if status is None:
                os.kill(pid, signal.SIGKILL)
                pending = pending_metadata(run_dir, life_wall)
            exit_code, _ = wait(pid, read, status)
            if exit_code != -signal.SIGKILL:
                break  # the life finished by itself: this lineage is complete
            lineage_kills += 1
            verified, problems = wait(*fork(verify, run_dir))
            newest = newest_checkpoint(run_dir / "ckpt")
            records.append(
                {
                    "lineage": len(lineages),
                    "mode": mode,
                    "after_s": round(time.perf_counter() - life_start, 3),
                    "writing_at_kill": seen,  # this life's own temporary files: killed mid-write
                    "pending_metadata_at_kill": pending,  # killed between the pair's renames
                    "loadable": verified == 0,
                    "problems": json.loads(problems or "[]") if verified in (0, 1) else [f"verifier exit {verified}"],
                    "newest_checkpoint": newest.name if newest else None,
                }
            )
        _, comparison = wait(*fork(compare, work / "reference", run_dir))
        lineages.append(
            {
                "kills": lineage_kills,
                "final_exit": exit_code,
                "temporaries_left": temporaries(run_dir),
                "comparison": json.loads(comparison) if comparison.strip() else None,
            }
        )
    print(
        json.dumps(
            {
                "kills": records,
                "lineages": lineages,
                "seconds": round(time.perf_counter() - started, 1),
                "reference_seconds": round(reference_seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
