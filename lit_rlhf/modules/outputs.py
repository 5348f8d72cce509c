"""Where a run's files go: its run directory (logs, samples, plot, checkpoints) and the export inside it."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import lightning as L


def run_directory(trainer: L.Trainer) -> str:
    """The run's directory: the first logger's (``lit-rlhf`` puts every logger in ``<root>/version_<N>``),
    else ``trainer.default_root_dir``.

    A collective under DDP/FSDP (``trainer.log_dir`` broadcasts rank 0's value): call it on every rank.
    """
    return (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir


def export_directory(export_dir: str | None, run_dir: str) -> str:
    """``export_dir`` as set, else ``export/`` in the run directory."""
    return export_dir if export_dir is not None else os.path.join(run_dir, "export")


@contextlib.contextmanager
def replaced_directory(path: str) -> Iterator[str]:
    """Write a directory whole or not at all: yields ``<path>.partial``, which replaces ``path`` at the end.

    An export that fails (or is killed) half-way leaves the previous ``path`` as it was.
    """
    partial, old = f"{path.rstrip(os.sep)}.partial", f"{path.rstrip(os.sep)}.old"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)
