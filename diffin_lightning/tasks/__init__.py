"""Post-hoc tasks on a training run's saved files: clean, delete, coreset."""

from diffin_lightning.tasks.clean import clean
from diffin_lightning.tasks.coreset import coreset
from diffin_lightning.tasks.delete import delete
from diffin_lightning.tasks.run import TrainedRun, load_run

__all__ = ["TrainedRun", "clean", "coreset", "delete", "load_run"]
