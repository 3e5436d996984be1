"""Refuse run-directory configs whose ``_target_`` would run code from outside an allow-list.

``analyze run_dir=X`` rebuilds the data module, the model and (for ``verify=true``) the
trainer from ``X/config.yaml`` with Hydra's ``instantiate``, which imports and calls whatever
``_target_`` names: ``os.system``, ``torch.hub.load`` of a local repository, any module on the
path. A run directory received from someone else is untrusted input, so every ``_target_`` in
it is checked before anything is built:

1. resolving its dotted path may import only modules inside the list (modules already imported
   run nothing when named again); anything else is refused before it is imported;
2. the object it resolves to must itself be defined inside an allowed module, so that a path
   that starts inside the list but walks out of it through an attribute
   (``diffin_lightning.callback.os.system``) is refused too.

Allowed by default: this package and the Lightning classes the bundled configs name
(:data:`DEFAULT_ALLOWED_MODULES`). Allow more on the command line
(``allowed_targets=[my_project.models]``) or in the environment
(``DIFFIN_ALLOWED_TARGETS=my_project.models,other_pkg``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffin_lightning.errors import UsageError

ENVIRONMENT_VARIABLE = "DIFFIN_ALLOWED_TARGETS"
DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "diffin_lightning",
    "lightning.pytorch.trainer",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.strategies",
)


class UntrustedTargetError(UsageError):
    """A config names a ``_target_`` outside the allow-list; nothing was imported or run."""


def allowed_modules(extra: Iterable[str] | str | None = None) -> tuple[str, ...]:
    """The default modules, those in ``$DIFFIN_ALLOWED_TARGETS`` and ``extra`` (names or a comma-separated string)."""
    names = list(DEFAULT_ALLOWED_MODULES)
    for source in (os.environ.get(ENVIRONMENT_VARIABLE, ""), extra):
        if source is None:
            continue
        items = source.replace(";", ",").split(",") if isinstance(source, str) else [str(item) for item in source]
        names.extend(item.strip() for item in items if item.strip())
    return tuple(dict.fromkeys(names))


def _inside(dotted: str, modules: tuple[str, ...]) -> bool:
    return any(dotted == module or dotted.startswith(module + ".") for module in modules)


def _targets(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, value
            else:
                yield from _targets(value, where)
    elif isinstance(node, list):
        for position, value in enumerate(node):
            yield from _targets(value, f"{path}[{position}]")


def _how_to_allow(module: str) -> str:
    return (
        f"A run directory from someone else can run any code this way. If you trust this one, allow the module on the "
        f"command line (allowed_targets=[{module}]) or in the environment ({ENVIRONMENT_VARIABLE}={module})."
    )


def _resolve_without_foreign_imports(target: str, modules: tuple[str, ...], context: str, listed: str) -> Any:
    """Resolve a dotted path as Hydra would, importing only modules inside the allow-list.

    Each part is an attribute of the previous object, an already imported module (importing
    it again runs nothing) or a module inside the allow-list; anything else would run a
    module's code on import, and is refused before it is imported.
    """
    parts = target.split(".")
    if not all(part.isidentifier() for part in parts):
        raise UntrustedTargetError(f"{context}, not a dotted path of Python names.")
    resolved: Any = None
    for position, part in enumerate(parts):
        name = ".".join(parts[: position + 1])
        if resolved is not None and hasattr(resolved, part):
            resolved = getattr(resolved, part)
        elif name in sys.modules:
            resolved = sys.modules[name]
        elif _inside(name, modules):
            try:
                resolved = importlib.import_module(name)
            except ImportError as error:
                raise UntrustedTargetError(f"{context}, which does not resolve ({error}).") from error
        else:
            raise UntrustedTargetError(
                f"{context}: resolving it would import {name!r}, outside the allowed modules ({listed}); nothing was "
                "imported or run. " + _how_to_allow(name)
            )
    return resolved


def check_config_targets(config: DictConfig | dict[str, Any], *, source: str, allowed: Iterable[str] | str | None = None) -> None:
    """Raise :class:`UntrustedTargetError` unless every ``_target_`` in ``config`` lies inside the allow-list.

    Args:
        config: the loaded config (interpolations are resolved first; only OmegaConf's own
            resolvers run).
        source: where the config came from, for the message (e.g. the config.yaml path).
        allowed: modules allowed on top of the defaults and the environment variable.

    Example::

        >>> check_config_targets({"model": {"_target_": "diffin_lightning.bundled.MLPClassifier"}}, source="config.yaml")
        >>> check_config_targets({"data": {"_target_": "os.system"}}, source="config.yaml")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        diffin_lightning.safe_config.UntrustedTargetError: config.yaml: data._target_ is 'os.system', which resolves to ... 'posix', ...
    """
    modules = allowed_modules(allowed)
    try:
        plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, (DictConfig, ListConfig)) else config
    except Exception as error:  # an interpolation that does not resolve: refuse, say where
        raise UntrustedTargetError(f"{source}: the config's interpolations do not resolve ({error}); cannot check its _target_s.") from error
    listed = ", ".join(modules)
    for where, target in _targets(plain, ""):
        if not isinstance(target, str) or not target:
            raise UntrustedTargetError(f"{source}: {where} must be a dotted path string; got {target!r}.")
        resolved = _resolve_without_foreign_imports(target, modules, f"{source}: {where} is {target!r}", listed)
        defined_in = getattr(resolved, "__module__", None)
        if not isinstance(defined_in, str) or not _inside(defined_in, modules):
            raise UntrustedTargetError(
                f"{source}: {where} is {target!r}, which resolves to an object defined in {defined_in!r}, outside the "
                f"allowed modules ({listed}); nothing was run. " + _how_to_allow(str(defined_in))
            )


def check_run_config(config_path: str | os.PathLike[str], *, allowed: Iterable[str] | str | None = None) -> DictConfig:
    """Load a run directory's ``config.yaml`` (YAML only, no code) and check its targets; returns it."""
    path = Path(config_path)
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig):
        raise UsageError(f"{path} must hold a mapping (a Hydra config); got a {type(config).__name__}.")
    check_config_targets(config, source=str(path), allowed=allowed)
    return config
