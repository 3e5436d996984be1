"""Building a run's data module and model from its config (a Hydra ``_target_`` mapping).

Used by the train app and by the post-hoc tasks that rebuild a finished run; it knows nothing of
the command line. The config must already be trusted (see :mod:`diffin_lightning.safe_config`):
``instantiate`` imports and calls whatever ``_target_`` names.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig


def accepted_kwargs(config: DictConfig, offered: dict[str, Any]) -> dict[str, Any]:
    """The offered keyword arguments that ``config._target_`` accepts and the config does not already set."""
    target = get_class(config._target_)
    parameters = inspect.signature(target.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {k: v for k, v in offered.items() if k not in config and (takes_any or k in parameters)}


def build_datamodule(data_config: DictConfig, **overrides: Any) -> Any:
    return instantiate(data_config, _convert_="all", **overrides)


def build_model(model_config: DictConfig, datamodule: Any) -> Any:
    """The model, told the data's input shape and class count where it takes them."""
    offered = datamodule.model_kwargs() if hasattr(datamodule, "model_kwargs") else {}
    # Plain containers, not OmegaConf ones: the saved hyperparameters must load with weights_only=True.
    return instantiate(model_config, _convert_="all", **accepted_kwargs(model_config, offered))
