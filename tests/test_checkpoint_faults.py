"""Checkpoints under faults: a full disk, damaged files, crafted payloads, SIGKILL mid-run and mid-write."""

import errno
import glob
import os
import zipfile
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import lit_rlhf.checkpoints as checkpoints
from lit_rlhf.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from tests import faults
from tests.helpers import SevensPPO, datamodule, small_module, trainer
from tests.test_cli import ROOT, run, tiny_overrides

# --- the checkpoint files -----------------------------------------------------------------------


def fit_with_checkpoints(assets, root, epochs=2, module=None, **kwargs):
    callback = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_epochs=1, save_top_k=1, save_last="link")
    t = trainer(root, epochs, [callback], enable_checkpointing=True, plugins=[AtomicCheckpointIO()], **kwargs)
    L.seed_everything(0, verbose=False)
    t.fit(module or small_module(assets, SevensPPO), datamodule=datamodule(assets))
    return t, callback


@pytest.fixture(scope="module")
def good_checkpoint(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    _, callback = fit_with_checkpoints(tiny_assets, root, epochs=1)
    return callback.last_model_path


@pytest.mark.parametrize("fault", ["oserror", "torch_enforce"])
def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_loadable(tiny_assets, tmp_path, monkeypatch, fault):
    """``oserror``: the file says ENOSPC; ``torch_enforce``: the real torch.save on /dev/full, which says only
    ``[enforce fail at inline_container.cc]`` -- both become an error naming the file, the full disk, the space left.
    """
    if fault == "oserror":
        real_save, calls = checkpoints.torch.save, [0]

        def full_disk(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                f.write(b"PK\x03\x04 the start of a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    else:
        if not os.path.exists("/dev/full"):
            pytest.skip("needs /dev/full (Linux)")
        faults.full_disk_at_save(monkeypatch, save=2)
    message = (
        r"could not write checkpoint .*epoch=1.*: the disk is full \(No space left on device\); [\d.]+ MiB free in"
    )
    with pytest.raises(OSError, match=message) as raised:
        fit_with_checkpoints(tiny_assets, tmp_path, epochs=2)
    assert raised.value.errno == errno.ENOSPC and "inline_container" not in str(raised.value)
    assert "earlier checkpoints are untouched" in str(raised.value)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert not [f for f in files if f.endswith(".partial")], "the half-written file is removed"
    checkpoint = load_checkpoint_file(str(tmp_path / "ckpt" / "last.ckpt"))
    assert checkpoint["epoch"] == 0, "the previous checkpoint is whole and loadable"


@pytest.mark.parametrize("damage", ["empty", "truncated", "bit_flip", "changed_weights", "not_a_checkpoint"])
def test_a_damaged_checkpoint_is_named_and_never_resumed(tiny_assets, good_checkpoint, tmp_path, damage):
    bad = tmp_path / "bad.ckpt"
    data = Path(good_checkpoint).read_bytes()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "bit_flip":  # one bit in the middle of the largest tensor's stored bytes
        with zipfile.ZipFile(good_checkpoint) as archive:
            tensors = [i for i in archive.infolist() if "/data/" in i.filename]
            member = max(tensors, key=lambda i: i.file_size)
        header = data[member.header_offset : member.header_offset + 30]
        start = (
            member.header_offset
            + 30
            + int.from_bytes(header[26:28], "little")
            + int.from_bytes(header[28:30], "little")
        )
        flipped = bytearray(data)
        flipped[start + member.file_size // 2] ^= 0x10
        bad.write_bytes(bytes(flipped))
    elif damage == "changed_weights":  # a valid file whose weights no longer match the digest saved with them
        checkpoint = torch.load(good_checkpoint, weights_only=True)
        key = next(k for k in checkpoint["state_dict"] if k.startswith("actor."))
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1e-3
        torch.save(checkpoint, bad)
    else:
        bad.write_text("not a checkpoint at all")
    message = {"empty": "is empty", "changed_weights": "is corrupted: its state_dict do not match the digest"}
    with pytest.raises(CheckpointError, match=f"checkpoint '{bad}' .*{message.get(damage, '')}"):
        L.seed_everything(0, verbose=False)
        t = trainer(tmp_path, 2, plugins=[AtomicCheckpointIO()])
        t.fit(small_module(tiny_assets, SevensPPO), datamodule=datamodule(tiny_assets), ckpt_path=str(bad))


class Payload:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_crafted_checkpoint_never_runs_its_payload(tiny_assets, good_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    checkpoint = torch.load(good_checkpoint, weights_only=True)
    checkpoint["extra"] = Payload(marker)
    torch.save(checkpoint, crafted)
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain data"):
        load_checkpoint_file(str(crafted))
    root = tmp_path / "runs"
    base = ["--config", os.path.join(ROOT, "configs", "ppo_tiny.yaml"), *tiny_overrides(tiny_assets, root)]
    for args in (
        ["export", *base, "--ckpt_path", str(crafted), "--export_dir", str(tmp_path / "out")],
        ["fit", *base, "--ckpt_path", str(crafted)],
    ):
        out = run(args, tmp_path, check=False)
        assert out.returncode != 0 and "cannot be loaded" in out.stderr and str(crafted) in out.stderr
    assert not marker.exists(), "the payload never ran"
    assert not (tmp_path / "out").exists(), "nothing was exported"


def test_every_torch_load_in_the_package_is_weights_only():
    for path in glob.glob(os.path.join(ROOT, "lit_rlhf", "**", "*.py"), recursive=True):
        source = Path(path).read_text()
        for call in source.split("torch.load(")[1:]:
            arguments = call[: call.index(")")]
            assert "weights_only=True" in arguments, f"{path}: torch.load({arguments})"


# --- faults in real runs (subprocesses) ---------------------------------------------------------


def cli_run(assets, root, tmp_path, epochs, callbacks=(), extra=(), check=True):
    """``train.py fit`` with configs/ppo_tiny.yaml on the tiny assets; ``callbacks`` are added to the config's."""
    args = ["fit", "--config", os.path.join(ROOT, "configs", "ppo_tiny.yaml"), *tiny_overrides(assets, root)]
    if callbacks:
        config = yaml.safe_load(Path(ROOT, "configs", "ppo_tiny.yaml").read_text())
        overrides = {"trainer": {"callbacks": config["trainer"]["callbacks"] + list(callbacks)}}
        (root / "faults.yaml").write_text(yaml.safe_dump(overrides))
        args += ["--config", str(root / "faults.yaml")]
    args += ["--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", "100", *extra]
    return run(args, tmp_path, check=check)


def steps(run_dir):
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.dropna(subset=["policy/loss"]).drop_duplicates(subset=["epoch", "step"], keep="last")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_bit_identical_metrics(tiny_assets, tmp_path):
    cli_run(tiny_assets, tmp_path / "full", tmp_path, 4)
    killed = cli_run(
        tiny_assets,
        tmp_path / "killed",
        tmp_path,
        4,
        [{"class_path": "tests.faults.KillAt", "init_args": {"epoch": 2, "batch": 1}}],
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = tmp_path / "killed" / "version_0"
    assert load_checkpoint_file(str(run_dir / "checkpoints" / "last.ckpt"))["epoch"] == 1, "rollouts 0-1 are saved"
    cli_run(tiny_assets, tmp_path / "killed", tmp_path, 4, extra=["--ckpt_path", "last"])
    assert sorted(p.name for p in (tmp_path / "killed").iterdir() if p.is_dir()) == ["version_0"]
    full, resumed = steps(tmp_path / "full" / "version_0"), steps(run_dir)
    for epoch in (2, 3):
        a, b = full[full.epoch == epoch], resumed[resumed.epoch == epoch]
        assert len(a) == 4  # 64 experiences / mini-batches of 32 x 2 PPO epochs
        for key in ("policy/loss", "critic/loss", "policy/grad_norm"):
            assert a[key].tolist() == b[key].tolist(), (epoch, key)  # bit-identical, not approximately


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tiny_assets, tmp_path):
    killed = cli_run(
        tiny_assets,
        tmp_path / "runs",
        tmp_path,
        3,
        [{"class_path": "tests.faults.KillDuringSave", "init_args": {"save": 2}}],
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    assert load_checkpoint_file(str(folder / "last.ckpt"))["epoch"] == 0, "the first checkpoint is whole"
    cli_run(tiny_assets, tmp_path / "runs", tmp_path, 2, extra=["--ckpt_path", "last"])
    assert load_checkpoint_file(str(folder / "last.ckpt"))["epoch"] == 1, "the resumed run went on from it"
