"""Settings groups to plain data and back: for checkpoints, loggers and configs given as dicts.

``as_group`` builds a group from a dict of its fields; ``to_plain`` turns groups, optimizers and
engines into dicts, lists and scalars (so checkpoints load with ``weights_only=True``);
``import_object`` resolves the dotted paths that configs name. Re-exported by ``lit_rlhf.settings``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

from lit_rlhf.rollout.engines.base import RolloutEngine

G = TypeVar("G")


def as_group(cls: type[G], value: G | Mapping[str, Any] | None) -> G:
    """``value`` as a ``cls`` group: an instance as is, a mapping of its fields, or None for the defaults.

    Raises:
        TypeError: naming the group and the unknown field, or the wrong type.
    """
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise TypeError(f"{cls.__name__} settings must be a {cls.__name__} or a dict of its fields, got {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; valid: {', '.join(sorted(names))}")
    return cls(**value)


def to_plain(group: Any) -> Any:
    """A group as plain data (dicts, lists, numbers, strings) for checkpoints and loggers.

    An optimizer becomes ``{class_path, init_args}`` (which :class:`OptimizerSettings` accepts back),
    so a checkpoint's hyperparameters load with ``weights_only=True``; a callable that cannot be
    named (a lambda) becomes None.
    """
    if dataclasses.is_dataclass(group):
        return {f.name: to_plain(getattr(group, f.name)) for f in dataclasses.fields(group)}
    if isinstance(group, Mapping):
        return {str(k): to_plain(v) for k, v in group.items()}
    if isinstance(group, list | tuple):
        return [to_plain(v) for v in group]
    if group is None or isinstance(group, bool | int | float | str):
        return group
    if isinstance(group, RolloutEngine):
        return group.to_config()
    return _callable_config(group)


def save_settings(module: Any, plain: dict) -> None:
    """Record a LightningModule's settings as its hyperparameters, in plain data.

    Built by LightningCLI, the module stores the CLI's own config (which the CLI parses back on
    ``--ckpt_path``); built from Python, ``plain`` (see :func:`to_plain`). Either way a checkpoint
    loads with ``weights_only=True``.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    if _given_hyperparameters.get() is not None:
        module.save_hyperparameters()
    else:
        module.save_hyperparameters(plain)


def _callable_config(value: Any) -> dict | None:
    init_args: dict = {}
    while isinstance(value, functools.partial):  # jsonargparse wraps the class and its init_args this way
        init_args = {**value.keywords, **init_args}
        value = value.args[-1] if value.args else value.func
    qualname, module = getattr(value, "__qualname__", ""), getattr(value, "__module__", None)
    if not module or "<" in qualname:  # a lambda or a local function cannot be imported back
        return None
    return {"class_path": f"{module}.{qualname}", "init_args": to_plain(init_args)}


def import_object(path: str, setting: str) -> Any:
    """The object at dotted ``path`` (``package.module.name``).

    Raises:
        ValueError: naming ``setting`` and why the import failed.
    """
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{setting} must be a dotted path 'package.module.name', got {path!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {setting} {path!r}: {err}") from err
