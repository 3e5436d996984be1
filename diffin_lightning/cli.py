"""What the Hydra apps share: where the configs live, one-line errors, building objects from configs."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from diffin_lightning.store import InfluenceFileError

# Inside the package (package data), so a wheel or `pip install .` carries them and the apps find
# them from any directory; the top-level configs/ of the repository only points here.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(ValueError):
    """A mistake in the command line or the files it names: printed as one line, exit code 2."""


def one_line_errors(app: F) -> F:
    """Turn usage mistakes into ``error: ...`` on stderr and exit code 2 instead of a traceback."""

    @functools.wraps(app)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return app(*args, **kwargs)
        except (UsageError, InfluenceFileError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


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


def resolved_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)
