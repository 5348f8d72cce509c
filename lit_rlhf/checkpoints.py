"""Checkpoints that survive: atomic writes, safe loading, and a digest that catches corrupted weights.

- :class:`AtomicCheckpointIO` writes ``<name>.partial`` beside the checkpoint, flushes it to disk,
  and renames it over the old file: a kill or a full disk mid-write leaves the previous checkpoint
  whole (Lightning's default writes elsewhere and moves the file, which is a copy across devices).
- Loading is ``torch.load(weights_only=True)`` only: a checkpoint cannot run code. A file that is
  empty, truncated or not a checkpoint is an error that names it.
- :func:`add_digest` stores a digest of the trainable weights and the optimizer state in each
  checkpoint; :func:`verify_digest` recomputes it on load (a flipped bit is an error naming the file).
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

DIGEST_KEY = "lit_rlhf_digest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with an atomic write and a safe, explained load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomically(checkpoint, str(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(str(path), map_location=map_location)


def write_atomically(checkpoint: dict[str, Any], path: str) -> None:
    """``torch.save`` to ``path`` so that the file is either the old one or the whole new one.

    Raises:
        OSError: naming the checkpoint, the cause (a full disk, a read-only directory) and the space left
            on its disk; the old file is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException as err:
        if os.path.exists(partial):
            os.remove(partial)
        if isinstance(err, OSError) or _is_write_failure(err):
            raise write_error(path, err) from err
        raise


# torch's zip writer reports a failed ``write`` (ENOSPC included) as an enforce failure of its own,
# with the file's OSError only as the exception's context
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "file write failed", "unexpected pos")


def _is_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_WRITE_FAILURES)


def _os_error(err: BaseException | None) -> OSError | None:
    """``err`` or the first ``OSError`` in its context chain (what the file system said)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def write_error(path: str, err: BaseException) -> OSError:
    """An ``OSError`` that says why writing checkpoint ``path`` failed, how much space is left, what is kept."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        space = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free in {directory!r}"
    except OSError:
        space = f"the free space in {directory!r} is unknown"
    cause = _os_error(err)
    code = cause.errno if cause is not None and cause.errno is not None else errno.EIO
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = f"the disk is full ({cause.strerror})"
    elif cause is not None:
        reason = f"the write failed ({cause.strerror or cause})"
    else:  # torch said nothing more: a full disk is the usual cause
        reason = f"the write failed (torch: {str(err).splitlines()[0]}), most often because the disk is full"
    kept = "keeps its previous contents" if os.path.exists(path) else "was not created"
    return OSError(
        code,
        f"could not write checkpoint {path!r}: {reason}; {space}. The file {kept} and earlier checkpoints are "
        "untouched: free space there or point the checkpoints elsewhere (ModelCheckpoint dirpath), then resume "
        "with --ckpt_path last",
    )


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint file, loaded without running any code from it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, truncated, not a checkpoint, or holds more than tensors
            and plain data (a pickle that would run code).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): the write that made it did not finish")
    try:
        checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every way a file can fail to load
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
            reason = "it holds objects other than tensors and plain data; they are never loaded (they could run code)"
        else:
            reason = f"it is truncated, corrupted or not a checkpoint ({type(err).__name__}: {text.splitlines()[0]})"
        raise CheckpointError(f"checkpoint {path!r} cannot be loaded: {reason}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _hash_tensors(tree: Any) -> str:
    """A digest of every tensor in ``tree`` (nested dicts/lists), in a fixed key order."""
    import xxhash

    digest = xxhash.xxh3_128()

    def visit(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}:{data.dtype}:{tuple(value.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, Mapping):
            for k in sorted(value, key=str):
                visit(value[k], f"{key}/{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                visit(v, f"{key}/{i}")

    visit(tree, "")
    return digest.hexdigest()


def _is_sharded(tree: Any) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return True
    if isinstance(tree, Mapping):
        return any(_is_sharded(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return any(_is_sharded(v) for v in tree)
    return False


def add_digest(checkpoint: dict[str, Any]) -> None:
    """Store a digest of the checkpoint's weights (``state_dict``) and ``optimizer_states``.

    Sharded (FSDP2) checkpoints hold each rank's shard only and get no digest.
    """
    parts = {name: checkpoint.get(name) for name in ("state_dict", "optimizer_states")}
    if _is_sharded(parts):
        return
    checkpoint[DIGEST_KEY] = {name: _hash_tensors(value) for name, value in parts.items() if value is not None}


def verify_digest(checkpoint: dict[str, Any], path: str | None) -> None:
    """Recompute the digest stored by :func:`add_digest` (a checkpoint without one passes).

    Raises:
        CheckpointError: naming the file and the part whose bytes changed.
    """
    stored = checkpoint.get(DIGEST_KEY)
    if not stored:
        return
    for name, expected in stored.items():
        if name in checkpoint and _hash_tensors(checkpoint[name]) != expected:
            raise CheckpointError(
                f"checkpoint {path or '(in memory)'!r} is corrupted: its {name} do not match the digest stored with "
                "them (bytes changed after it was written); resume from an earlier checkpoint"
            )


def looks_complete(path: Path) -> bool:
    """A cheap check that a checkpoint was written whole: a readable zip file, or a sharded folder."""
    if path.is_dir():
        return (path / ".metadata").is_file()
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root/version_<N>/checkpoints/`` (newest run first).

    Every ``*.ckpt`` there counts (``last.ckpt`` may be a link to one of them), so a run killed
    between writing a checkpoint and re-pointing ``last.ckpt`` still resumes from the newest one.
    """
    versions = []
    for run in root.glob("version_*") if root.is_dir() else []:
        number = run.name.removeprefix("version_")
        if number.isdigit():
            versions.append((int(number), run))
    for _, run in sorted(versions, reverse=True):
        complete = [p for p in (run / "checkpoints").glob("*.ckpt") if p.exists() and looks_complete(p.resolve())]
        if complete:
            return max(complete, key=lambda p: (p.resolve().stat().st_mtime, p.name == "last.ckpt"))
    return None
