"""What the Hydra apps share: where the configs live, one-line errors, build errors named by config group.

The post-hoc tasks import none of this: :class:`~diffin_lightning.errors.UsageError` and the builders
(:mod:`diffin_lightning.builders`) live outside it.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException, OverrideParseException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from diffin_lightning.errors import UsageError
from diffin_lightning.store import InfluenceFileError

# Inside the package (package data), so a wheel or `pip install .` carries them and the apps find
# them from any directory; the top-level configs/ of the repository only points here.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")

F = TypeVar("F", bound=Callable[..., Any])
# The config groups of the apps (overrides of these pick files; the rest set keys).
_GROUP_NAMES = ("data", "model", "trainer", "influence", "experiment")


def one_line_errors(app: F) -> F:
    """Turn usage mistakes into one ``error: ...`` line on stderr and exit code 2 instead of a traceback.

    Goes outside ``@hydra.main`` so that it also sees Hydra's own errors: a config-group option
    or a key that does not exist, an override that does not parse. It asks Hydra to raise them
    (``HYDRA_FULL_ERROR``) instead of printing them its own way, and prints one line naming the
    argument, the rule, the value and the fix. Anything else (a bug) keeps its traceback. A user
    who sets ``HYDRA_FULL_ERROR=1`` gets the full traceback of every error.
    """

    @functools.wraps(app)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return app(*args, **kwargs)
        os.environ["HYDRA_FULL_ERROR"] = "1"
        stderr = sys.stderr
        sys.stderr = _WithoutHydraJobLine(stderr)  # type: ignore[assignment]
        try:
            return app(*args, **kwargs)
        except Exception as error:
            message = usage_message(error)
            if message is None:
                raise
            print(f"error: {message}", file=stderr)
            sys.exit(2)
        finally:
            sys.stderr = stderr
            os.environ.pop("HYDRA_FULL_ERROR", None)

    return wrapper  # type: ignore[return-value]


class _WithoutHydraJobLine:
    """stderr without the "Error executing job with overrides" line Hydra writes before re-raising."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Error executing job with overrides:"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def usage_message(error: BaseException) -> str | None:
    """The one-line message for a user's mistake, or ``None`` for anything else."""
    if isinstance(error, (UsageError, InfluenceFileError)):
        return " ".join(str(error).split("\n"))
    if isinstance(error, MissingConfigException):
        return _missing_option_message(error)
    if isinstance(error, ConfigCompositionException):
        return _override_message(error)
    if isinstance(error, OverrideParseException):
        return f"an override does not parse: {' '.join(str(error).split())}. Write overrides as key=value (quote lists: \"k=[1,2]\")."
    return None


def _missing_option_message(error: MissingConfigException) -> str:
    missing = error.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    if not group:
        return f"{str(error).splitlines()[0]}"
    options = list(error.options or [])
    close = difflib.get_close_matches(option, options, n=1)
    hint = f"Did you mean {group}={close[0]}?" if close else f"Example: {group}={options[0]}" if options else ""
    return f"{group}={option}: the config group '{group}' has no option {option!r} (options: {', '.join(options) or 'none'}). {hint}".strip()


def _override_message(error: ConfigCompositionException) -> str:
    text = str(error)
    match = re.search(r"Could not override '([^']+)'", text)
    if match is None:
        cause = f": {str(error.__cause__).splitlines()[0]}" if error.__cause__ is not None else ""
        return f"{text.splitlines()[0]}{cause}"
    key = match.group(1)
    value = next((arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith(f"{key}=")), "...")
    parent, _, leaf = key.rpartition(".")
    known = _keys_of(parent)
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"Did you mean {parent + '.' if parent else ''}{close[0]}={value}? " if close else ""
    return (
        f"{key}={value}: the config has no key {key!r}, and an override can only change an existing key. "
        f"{hint}To add a new key write +{key}={value}."
    )


def _keys_of(parent: str) -> list[str]:
    """The keys under ``parent`` in the app's config as composed from its defaults (for spelling hints)."""
    try:
        from hydra import compose, initialize_config_dir

        config_name = "analyze" if Path(sys.argv[0]).name.endswith("analyze") or "analyze" in sys.argv[0] else "train"
        overrides = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith(("-", "+", "hydra.")) and arg.split("=", 1)[0] in _GROUP_NAMES]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            config = compose(config_name=config_name, overrides=overrides)
        node = OmegaConf.select(config, parent) if parent else config
        return [str(key) for key in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:  # a hint only: never let it hide the real message
        return []


def built(group: str, config: DictConfig, build: Callable[[], Any]) -> Any:
    """``build()``, with a bad value in config group ``group`` turned into a :class:`UsageError` naming it.

    The classes the configs name check their arguments and say what is wrong (rule, value, fix);
    this adds which group and class the value came from, and drops Hydra's wrapping.
    """
    try:
        return build()
    except (InstantiationException, ValueError, TypeError, MisconfigurationException) as error:
        cause: BaseException = error
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        message = " ".join(str(cause).split())
        target = config.get("_target_", "?") if isinstance(config, DictConfig) else "?"
        fix = ""
        if group == "trainer" and "gpu" in message.lower() and not torch.cuda.is_available():
            fix = " This machine has no CUDA GPU: use trainer=cpu."
        raise UsageError(f"{group} ({target}): {message}{fix}") from error


def resolved_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)
