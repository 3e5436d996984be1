"""Bundled data and models: scikit-learn's digits (no download), a synthetic generator, small classifiers."""

from diffin_lightning.bundled.datamodule import ClassificationDataModule
from diffin_lightning.bundled.digits import DigitsDataModule, load_digits_splits
from diffin_lightning.bundled.models import CNNClassifier, MLPClassifier
from diffin_lightning.bundled.synthetic import SyntheticDataModule

__all__ = [
    "CNNClassifier",
    "ClassificationDataModule",
    "DigitsDataModule",
    "MLPClassifier",
    "SyntheticDataModule",
    "load_digits_splits",
]
