"""Where a run's files go: its run directory (logs, samples, plot, checkpoints) and the export inside it.

An export replaces its folder whole, so it only ever replaces what lit_rlhf wrote: every export holds
``lit_rlhf_export.json`` (its kind and the files it wrote), and a folder that is not empty is replaced
only when it is an earlier export of the same kind holding nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import lightning as L

EXPORT_MARKER = "lit_rlhf_export.json"


class ExportDirError(ValueError):
    """An export folder that an export may not replace; the message names the folder, the setting and the fix."""


def run_directory(trainer: L.Trainer) -> str:
    """The run's directory: the first logger's (``lit-rlhf`` puts every logger in ``<root>/version_<N>``),
    else ``trainer.default_root_dir``.

    A collective under DDP/FSDP (``trainer.log_dir`` broadcasts rank 0's value): call it on every rank.
    """
    return (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir


def export_directory(export_dir: str | None, run_dir: str) -> str:
    """``export_dir`` as set, else ``export/`` in the run directory."""
    return export_dir if export_dir is not None else os.path.join(run_dir, "export")


def run_outputs(trainer: L.Trainer, run_dir: str) -> dict[str, str]:
    """The run's own folders an export must never replace: its root, run directory and checkpoint directories."""
    outputs = {}
    if re.fullmatch(r"version_\d+", Path(run_dir).name):
        outputs["the run root"] = str(Path(run_dir).parent)  # the largest first: the error names it
    outputs["the run directory"] = run_dir
    for callback in trainer.checkpoint_callbacks:
        outputs["the checkpoint directory"] = getattr(callback, "dirpath", None) or run_dir
    return outputs


def checkpoint_outputs(ckpt_path: str) -> dict[str, str]:
    """What an export from ``ckpt_path`` must never replace: the checkpoint, its folder and, for a checkpoint in
    ``<root>/version_<N>/checkpoints/``, its run directory and run root.
    """
    path, outputs = Path(ckpt_path).resolve(), {}
    for parent in path.parents:
        if re.fullmatch(r"version_\d+", parent.name):
            outputs = {"the run root": str(parent.parent), "the run directory": str(parent)}  # the largest first
            break
    return {**outputs, "the checkpoint's folder": str(path.parent), "the checkpoint": str(path)}


def check_outputs(trainer: L.Trainer, export_dir: str | None, run_dir: str, kind: str) -> None:
    """Before training: the export folder and the checkpoint folders can be written, and the export would
    replace nothing but an earlier export of ``kind`` (see :func:`check_export_dir`).
    """
    from lit_rlhf.modules.ppo_setup import check_writable

    path = export_directory(export_dir, run_dir)
    outputs = {"export_dir": path}
    for callback in trainer.checkpoint_callbacks:
        outputs["the checkpoint directory"] = getattr(callback, "dirpath", None) or run_dir
    check_writable(outputs)
    check_export_dir(path, kind, "export_dir", run_outputs(trainer, run_dir))


def check_export_dir(path: str, kind: str | None, setting: str, protected: dict[str, str] | None = None) -> None:
    """An export of ``kind`` may replace ``path``: it holds none of ``protected`` (name -> folder) and is new,
    empty, or an earlier export of ``kind`` (None: of any kind) that holds only the files that export wrote.

    Raises:
        ExportDirError: naming the setting, the folder, what it holds and the fix.
    """
    target = Path(path).resolve()
    for name, folder in (protected or {}).items():
        if folder and (target == Path(folder).resolve() or target in Path(folder).resolve().parents):
            raise ExportDirError(
                f"{setting} {path!r} would replace {name} {folder!r}: an export replaces its folder whole. "
                "Choose a folder outside it"
                + (" (or leave export_dir unset: export/ in the run directory)" if setting == "export_dir" else "")
            )
    for folder in (target, _sibling(target, "partial"), _sibling(target, "old")):
        _check_replaceable(folder, kind, setting, path)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name}.{suffix}")


def _check_replaceable(folder: Path, kind: str | None, setting: str, path: str) -> None:
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise ExportDirError(f"{setting} {path!r}: {str(folder)!r} is a file, not a folder; choose another folder")
    found = _files(folder)
    if not found:
        return
    marker = _read_marker(folder)
    if marker is None or kind not in (None, marker.get("kind")):
        what = "no lit_rlhf export" if marker is None else f"a lit_rlhf {marker.get('kind')!r} export"
        raise ExportDirError(
            f"{setting} {path!r}: {str(folder)!r} is not empty and is {what} (it holds {_listing(found)}), "
            f"not an earlier {kind or 'lit_rlhf'!r} export; an export replaces its folder whole and never deletes "
            "what it did not write. Choose a new or empty folder"
        )
    extra = sorted(set(found) - set(marker.get("files", [])))
    if extra:
        raise ExportDirError(
            f"{setting} {path!r}: the earlier export in {str(folder)!r} now also holds files it did not write "
            f"({_listing(extra)}); move them out or choose a new folder"
        )


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative paths), the export marker left out."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir() and p.name != EXPORT_MARKER)


def _listing(files: list[str]) -> str:
    shown = ", ".join(files[:5])
    return shown + (f" and {len(files) - 5} more" if len(files) > 5 else "")


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(folder: str, kind: str) -> None:
    files = _files(Path(folder))
    marker = {"written_by": "lit_rlhf", "kind": kind, "files": files}
    Path(folder, EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


@contextlib.contextmanager
def replaced_directory(path: str, kind: str, module: L.LightningModule | None = None) -> Iterator[str]:
    """Write an export of ``kind`` whole or not at all: yields ``<path>.partial``, which replaces ``path`` at
    the end, with ``module``'s model card (``README.md``, when a module is given) and the export marker.

    An export that fails (or is killed) half-way leaves the previous ``path`` as it was; a ``path`` that is not
    an earlier export of ``kind`` is never replaced (:class:`ExportDirError`).
    """
    check_export_dir(path, kind, "the export folder")
    partial, old = f"{path.rstrip(os.sep)}.partial", f"{path.rstrip(os.sep)}.old"
    shutil.rmtree(partial, ignore_errors=True)  # an earlier export's leftover (checked above)
    os.makedirs(partial)
    _write_marker(partial, kind)  # a killed export's leftover is known as ours
    try:
        yield partial
        if module is not None:
            from lit_rlhf.modules.model_card import card_facts, write_model_card

            write_model_card(partial, **card_facts(module, kind))
        _write_marker(partial, kind)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)
