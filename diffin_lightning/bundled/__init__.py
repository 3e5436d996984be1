"""Bundled data and models: scikit-learn's digits (no download) and small classifiers."""

from diffin_lightning.bundled.digits import DigitsData, load_digits_splits
from diffin_lightning.bundled.models import MLPClassifier

__all__ = ["DigitsData", "MLPClassifier", "load_digits_splits"]
