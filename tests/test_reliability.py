"""Reliability: nothing silent, nothing lost, no code from a checkpoint. Faults are injected into real runs."""

import errno
import glob
import json
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
import lit_rlhf.modules.ppo as ppo_module
from lit_rlhf import PPOModule, PromptDataModule
from lit_rlhf.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from lit_rlhf.precision import AutoPrecision
from lit_rlhf.rewards import RewardFunction, RewardModel
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


# --- the divergence guard -----------------------------------------------------------------------


def poison(monkeypatch, calls: set[int]):
    """Make the loss of the given ppo_micro_step calls NaN (as a blown-up learning rate would)."""
    real, count = ppo_module.ppo_micro_step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if count[0] in calls else (loss, stats)

    monkeypatch.setattr(ppo_module, "ppo_micro_step", step)


def test_a_nan_step_is_skipped_with_the_weights_untouched(tiny_assets, tmp_path, monkeypatch):
    poison(monkeypatch, {5, 6})  # step 3 (two micro-batches per step) of rollout 0
    snapshots = []

    class Weights(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            snapshots.append({k: v.clone() for k, v in module.actor.state_dict().items()})

    module = small_module(tiny_assets, SevensPPO)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, 1, [Weights()])
    t.fit(module, datamodule=datamodule(tiny_assets))
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1]), "step 3 changed nothing"
    assert any(not torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2]), "step 4 trained again"
    logged = pd.read_csv(os.path.join(t.log_dir, "metrics.csv")).dropna(subset=["policy/skipped_steps"])
    assert logged["policy/skipped_steps"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert all(torch.isfinite(v).all() for v in module.actor.state_dict().values())


def test_nan_steps_in_a_row_stop_the_run_naming_the_cause(tiny_assets, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(9, 100)))  # from rollout 1's first step on
    module = small_module(tiny_assets, SevensPPO, optim={"max_nonfinite_steps": 2})
    with pytest.raises(FloatingPointError) as err:
        fit_with_checkpoints(tiny_assets, tmp_path, epochs=3, module=module)
    message = str(err.value)
    assert "policy/grad_norm was nan at rollout 1, mini-batch 1; 2 optimizer steps in a row" in message
    assert "Last good checkpoint: " in message and "epoch=0" in message


def test_non_finite_weights_stop_the_rollout_before_sampling(tiny_assets, tmp_path):
    module = small_module(tiny_assets, SevensPPO)
    module.configure_model()
    with torch.no_grad():
        next(module.actor.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="logits are not finite before sampling"):
        trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))


# --- wrong model in a role ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory, tiny_assets):
    """A reward model with a different (BPE) tokenizer."""
    from lit_rlhf.tasks import save_tiny_models, tiny_llama_config, train_tokenizer

    tok = train_tokenizer(["12+34=46", "7-3=4"] * 50, kind="bpe", vocab_size=300)
    return save_tiny_models(str(tmp_path_factory.mktemp("bpe")), tok, tiny_llama_config(tok, 32, 1, 4))


@pytest.mark.parametrize(
    "case,message",
    [
        ("classifier as actor", "models.actor_path .* is a LlamaForSequenceClassification without the 'lm_head'"),
        ("causal LM as reward model", "reward model reward_model .* is a LlamaForCausalLM without the 'score' head"),
        ("critic without a head", "the critic's starting point .* without the 'score' head .*new_value_head: true"),
        ("critic with another vocabulary", "the critic would start from .*whose tokenizer differs from the actor's"),
    ],
)
def test_a_model_in_the_wrong_role_is_named_before_training(tiny_assets, other_vocabulary, tmp_path, case, message):
    policy, reward = tiny_assets["policy"], tiny_assets["reward"]
    rewards, models = [RewardFunction(lambda prompts, responses: [0.0] * len(prompts), name="zero")], {}
    if case == "classifier as actor":
        models = {"actor_path": reward, "critic_path": reward}
    elif case == "causal LM as reward model":
        rewards, models = [RewardModel(policy)], {"critic_path": reward}
    elif case == "critic without a head":
        models = {"new_value_head": False}
    else:  # the critic defaults to the first reward model's path: here one with a BPE tokenizer
        rewards, models = [RewardModel(other_vocabulary["reward"])], {"new_value_head": False}
    with pytest.raises(ValueError, match=message):
        module = small_module(tiny_assets, PPOModule, rewards=rewards, models=models)
        trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))
    if case == "critic with another vocabulary":
        assert module.actor is None, "caught in setup, before any model loads"


def test_the_critic_defaults_to_the_actor_with_a_new_head_and_a_headless_critic_path_fails_at_once(tiny_assets):
    from lit_rlhf.modules.ppo_setup import build_models

    zero = RewardFunction(lambda prompts, responses: [0.0] * len(prompts), name="zero")
    module = small_module(tiny_assets, PPOModule, rewards=[zero], models={"new_value_head": None})
    assert module.critic_path == tiny_assets["policy"]
    critic = build_models(module.models, module.tokenizer, True, module.critic_path).critic
    assert critic is not None and critic.model.score.weight.shape[0] == 1  # a new scalar head on the actor
    with pytest.raises(ValueError, match="models.critic_path .* without the 'score' head .*new_value_head: true"):
        small_module(
            tiny_assets,
            PPOModule,
            rewards=[zero],
            models={"critic_path": tiny_assets["policy"], "new_value_head": None},
        )


# --- settings and data that used to run silently wrong ------------------------------------------


@pytest.mark.parametrize(
    "groups,message",
    [
        ({"algorithm": {"micro_batch_size": -4}}, "algorithm.micro_batch_size must be >= 1, got -4"),
        ({"algorithm": {"lam": 5.0}}, "algorithm.lam must be in \\[0, 1\\], got 5.0"),
        ({"algorithm": {"gamma": -1.0}}, "algorithm.gamma must be in \\[0, 1\\], got -1.0"),
        ({"kl": {"coef": -0.1}}, "kl.coef must be >= 0, got -0.1"),
        ({"algorithm": {"dual_clip": 0.5}}, "algorithm.dual_clip must be > 1"),
        ({"rollout": {"rollout_batch_size": 0}}, "rollout.rollout_batch_size must be >= 1, got 0"),
        (
            {
                "algorithm": {"advantage_estimator": "grpo"},
                "generation": {"temperature": 0.0, "n_samples_per_prompt": 2},
            },
            "generation.temperature=0 samples greedily",
        ),
    ],
)
def test_settings_that_used_to_train_nothing_are_refused(tiny_assets, groups, message):
    with pytest.raises(ValueError, match=message):
        small_module(tiny_assets, SevensPPO, **groups)


@pytest.mark.parametrize(
    "data,records,message",
    [
        ({"max_prompt_len": 0}, None, "data.max_prompt_len must be >= 1, got 0"),
        ({"max_prompt_len": -3}, None, "data.max_prompt_len must be >= 1, got -3"),
        ({"val_batch_size": 0}, None, "data.val_batch_size must be >= 1, got 0"),
        ({}, [{"prompt": None}], "row 1, field 'prompt': expected a string, got NoneType None"),
        ({}, [{"prompt": "  "}], "row 1, field 'prompt': the prompt is empty"),
        ({"max_prompt_len": 1024}, [{"prompt": "1" * 300}], "exceed the actor's position range \\(256"),
    ],
)
def test_bad_data_is_named_before_any_model_loads(tiny_assets, tmp_path, data, records, message):
    path = tiny_assets["prompts"]
    if records is not None:
        path = str(tmp_path / "prompts.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records * 20)
    module = small_module(tiny_assets, SevensPPO)
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, 1).fit(module, datamodule=PromptDataModule(path, **data))
    assert module.actor is None


def test_an_unwritable_export_dir_fails_before_training(tiny_assets, tmp_path):
    (tmp_path / "a_file").write_text("")
    module = small_module(tiny_assets, SevensPPO, export_dir=str(tmp_path / "a_file" / "export"))
    with pytest.raises(PermissionError, match="export_dir .*a_file/export' cannot be written"):
        trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))
    assert module.actor is None


def test_an_export_that_fails_half_way_leaves_the_previous_one(tiny_assets, tmp_path, monkeypatch):
    module = small_module(tiny_assets, SevensPPO, export_dir=str(tmp_path / "export"))
    trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))
    before = (tmp_path / "export" / "actor" / "model.safetensors").read_bytes()
    monkeypatch.setattr(
        type(module.critic), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        module.export_pretrained(str(tmp_path / "export"))
    assert (tmp_path / "export" / "actor" / "model.safetensors").read_bytes() == before
    assert (tmp_path / "export" / "critic" / "config.json").exists() and not (tmp_path / "export.partial").exists()


# --- precision that fits every CPU ---------------------------------------------------------------


def test_precision_follows_what_the_cpu_does_fast(monkeypatch):
    import lit_rlhf.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert AutoPrecision(device="cpu").precision == "32-true", "AVX2 only: fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert AutoPrecision(device="cpu").precision == "bf16-mixed"
    assert AutoPrecision(mode="32-true", device="cpu").precision == "32-true", "a setting forces fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert AutoPrecision(mode="bf16-mixed", device="cpu").precision == "bf16-mixed", "or bf16"
    with AutoPrecision(device="cpu").forward_context():
        assert not torch.is_autocast_cpu_enabled()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    with AutoPrecision(device="cpu").forward_context():
        assert torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16
