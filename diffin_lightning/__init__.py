"""diffin_lightning: Diff-In data influence recorded during PyTorch Lightning training.

Sign convention everywhere: influence(i) approximates L_V(theta_T without i) - L_V(theta_T);
positive = sample i helped the target, negative = harmful.
"""

from diffin_lightning.callback import DiffInCallback
from diffin_lightning.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader, dataset_fingerprint
from diffin_lightning.ranking import Ranked, select, top_k
from diffin_lightning.store import (
    SIGN_CONVENTION,
    InfluenceFileError,
    InfluenceResult,
    TargetInfluence,
    load_influence,
    save_influence,
)
from diffin_lightning.replay import trajectory_influence
from diffin_lightning.trajectory import TrajectoryLog, TrajectoryLogError
from diffin_lightning.version import __version__

__all__ = [
    "DiffInCallback",
    "EpochSeededSampler",
    "IndexedDataset",
    "InfluenceFileError",
    "InfluenceResult",
    "Ranked",
    "ResumableDataLoader",
    "SIGN_CONVENTION",
    "TargetInfluence",
    "TrajectoryLog",
    "TrajectoryLogError",
    "__version__",
    "dataset_fingerprint",
    "load_influence",
    "save_influence",
    "trajectory_influence",
    "select",
    "top_k",
]
