"""Exports: they replace only what lit_rlhf wrote, fail before training when they cannot be written, carry a
model card, and push to the Hub (the client mocked at its boundary, never the network).
"""

import json
import os

import lightning as L
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf import PreferenceDataModule, RewardModelModule, SFTDataModule, SFTModule
from lit_rlhf.cli import export
from lit_rlhf.modules.outputs import EXPORT_MARKER, ExportDirError, replaced_directory
from lit_rlhf.tasks.arithmetic import preference_records, sft_records, split_problems, write_jsonl
from tests.helpers import SevensPPO, datamodule, small_module, trainer
from tests.test_cli import ROOT, run, tiny_overrides


def write_export(path, kind="ppo", name="actor/model.safetensors", data=b"weights"):
    with replaced_directory(str(path), kind) as partial:
        os.makedirs(os.path.dirname(os.path.join(partial, name)), exist_ok=True)
        with open(os.path.join(partial, name), "wb") as f:
            f.write(data)


# --- what an export may replace -------------------------------------------------------------------


def test_an_export_never_replaces_a_folder_of_the_users_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportDirError, match=r"mine' is not empty and is no lit_rlhf export \(it holds notes.txt\)"):
        write_export(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["mine"], "no .partial or .old left beside it"


def test_re_exporting_replaces_an_earlier_export_of_the_same_kind_only(tmp_path):
    write_export(tmp_path / "out", data=b"first")
    marker = json.loads((tmp_path / "out" / EXPORT_MARKER).read_text())
    assert marker["kind"] == "ppo" and marker["files"] == ["actor/model.safetensors"]
    write_export(tmp_path / "out", data=b"second")
    assert (tmp_path / "out" / "actor" / "model.safetensors").read_bytes() == b"second"
    with pytest.raises(ExportDirError, match=r"is a lit_rlhf 'ppo' export .* not an earlier 'sft' export"):
        write_export(tmp_path / "out", kind="sft", name="model.safetensors")
    (tmp_path / "out" / "actor" / "my_eval.json").write_text("{}")  # the user's file in an earlier export
    with pytest.raises(ExportDirError, match=r"also holds files it did not write \(actor/my_eval.json\)"):
        write_export(tmp_path / "out", data=b"third")
    assert (tmp_path / "out" / "actor" / "model.safetensors").read_bytes() == b"second"
    assert (tmp_path / "out" / "actor" / "my_eval.json").exists()


def test_a_users_folder_beside_the_export_named_like_its_scratch_folder_is_kept(tmp_path):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "data.csv").write_text("1,2")
    with pytest.raises(ExportDirError, match=r"out.partial' is not empty"):
        write_export(tmp_path / "out")
    assert (tmp_path / "out.partial" / "data.csv").read_text() == "1,2"


def test_cli_export_into_a_folder_of_user_files_fails_before_loading_the_checkpoint(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.jsonl").write_text("{}\n")
    args = ["--ckpt_path", str(tmp_path / "no_such.ckpt"), "--export_dir", str(tmp_path / "mine")]
    with pytest.raises(ExportDirError, match=r"--export_dir .*mine' is not empty .*never deletes what it did not"):
        export(args)  # the checkpoint does not even exist: the folder is checked first
    assert (tmp_path / "mine" / "data.jsonl").read_text() == "{}\n"


def test_cli_export_over_the_checkpoints_run_is_refused(tmp_path):
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"checkpoint")
    for folder, name in [("runs", "the run root"), ("runs/version_0", "the run directory")]:
        args = ["--ckpt_path", str(ckpt), "--export_dir", str(tmp_path / folder)]
        with pytest.raises(ExportDirError, match=f"would replace {name} .*Choose a folder outside it"):
            export(args)
    assert ckpt.read_bytes() == b"checkpoint"


def test_fit_with_export_dir_at_the_run_root_fails_before_training_and_keeps_the_earlier_run(tiny_assets, tmp_path):
    """The reported case: ``fit --model.init_args.export_dir <root>`` deleted the earlier run's version_0."""
    root = tmp_path / "runs"
    earlier = root / "version_0" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"the earlier run's checkpoint")
    base = ["--config", os.path.join(ROOT, "configs/ppo_tiny.yaml"), *tiny_overrides(tiny_assets, root)]
    out = run(["fit", *base, "--model.init_args.export_dir", str(root), "--trainer.max_epochs", "1"], tmp_path, False)
    assert out.returncode != 0
    assert f"export_dir {str(root)!r} would replace the run root" in out.stderr
    assert earlier.read_bytes() == b"the earlier run's checkpoint"
    assert not (root / "actor").exists() and "Training" not in out.stdout


# --- SFT and reward model: checked before training ------------------------------------------------


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root, splits = tmp_path_factory.mktemp("task"), split_problems(0)
    files = {"sft": str(root / "sft.jsonl"), "pairs": str(root / "pairs.jsonl")}
    write_jsonl(files["sft"], sft_records(splits["train"], 64, 0.0, 0))
    write_jsonl(files["pairs"], preference_records(splits["train"], 64, 2))
    return files


def single_trainer(tmp_path, **kwargs):
    return L.Trainer(
        max_steps=2,
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_an_unwritable_or_unsafe_export_dir_fails_before_sft_and_reward_training(
    tiny_assets, task_files, tmp_path, stage
):
    cls, data = (SFTModule, SFTDataModule) if stage == "sft" else (RewardModelModule, PreferenceDataModule)
    path = task_files["sft" if stage == "sft" else "pairs"]
    (tmp_path / "a_file").write_text("")
    module = cls(models={"path": tiny_assets["policy"]}, export_dir=str(tmp_path / "a_file" / "export"))
    with pytest.raises(PermissionError, match="export_dir .*a_file/export' cannot be written"):
        single_trainer(tmp_path).fit(module, datamodule=data(path, batch_size=4))
    assert module.trained is None, "no model was loaded, nothing was trained"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "paper.tex").write_text("draft")
    module = cls(models={"path": tiny_assets["policy"]}, export_dir=str(tmp_path / "mine"))
    with pytest.raises(ExportDirError, match=r"export_dir .*mine' is not empty"):
        single_trainer(tmp_path).fit(module, datamodule=data(path, batch_size=4))
    assert module.trained is None and (tmp_path / "mine" / "paper.tex").read_text() == "draft"


def test_sft_export_carries_a_model_card_and_re_exports_in_place(tiny_assets, task_files, tmp_path):
    L.seed_everything(0, verbose=False)
    module = SFTModule(models={"path": tiny_assets["policy"]}, export_dir=str(tmp_path / "sft"))
    single_trainer(tmp_path).fit(module, datamodule=SFTDataModule(task_files["sft"], batch_size=4))
    card = ModelCard.load(tmp_path / "sft" / "README.md")
    assert card.data.library_name == "transformers" and "lit_rlhf" in card.data.tags
    assert card.data.base_model is None, "a local path is no Hub reference"
    assert f"`{tiny_assets['policy']}`" in card.text and "supervised fine-tuning" in card.text
    assert "`sft/loss` |" in card.text, "the final metrics"
    assert "export_dir:" in card.text and "(Python API)" in card.text, "the settings and the command"
    marker = json.loads((tmp_path / "sft" / EXPORT_MARKER).read_text())
    assert "README.md" in marker["files"] and "model.safetensors" in marker["files"]
    module.export_pretrained(str(tmp_path / "sft"))  # an earlier export of the same kind is replaced
    assert (tmp_path / "sft" / "model.safetensors").is_file()


# --- lit-rlhf export --push_to_hub -------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    """HfApi's two calls, recorded: the client's boundary, so nothing reaches the network."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        files = sorted(
            os.path.relpath(os.path.join(d, f), kwargs["folder_path"]) for d, _, fs in os.walk(kwargs["folder_path"])
            for f in fs
        )  # fmt: skip
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_cli_export_pushes_the_folder_with_its_card(tiny_assets, tmp_path, hub, capsys):
    callback = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    t = trainer(tmp_path, 1, [callback], enable_checkpointing=True)
    t.fit(small_module(tiny_assets, SevensPPO), datamodule=datamodule(tiny_assets))
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  class_path: tests.helpers.SevensPPO\n  init_args:\n    models:\n"
                      f"      actor_path: {tiny_assets['policy']}\n      new_value_head: true\n"
                      f"data:\n  class_path: lit_rlhf.PromptDataModule\n  init_args:\n"
                      f"    path: {tiny_assets['prompts']}\n")  # fmt: skip
    out = tmp_path / "out"
    args = ["--config", str(config), "--ckpt_path", callback.last_model_path, "--export_dir", str(out)]
    export([*args, "--push_to_hub", "me/tiny-ppo", "--hub_private"])
    assert [c[0] for c in hub] == ["create_repo", "create_repo", "upload_folder"], "the repo is checked first"
    assert hub[0][2]["private"] is True and hub[2][1] == "me/tiny-ppo" and hub[2][2]["folder_path"] == str(out)
    assert EXPORT_MARKER in hub[2][2]["ignore_patterns"], "the marker stays local"
    assert {"README.md", "actor/model.safetensors", "critic/config.json"} <= set(hub[2][2]["files"])
    card = ModelCard.load(out / "README.md")
    assert "advantage estimator `gae`" in card.text and "_instantiator" not in card.text
    assert "pushed" in capsys.readouterr().out
    exported = torch.load(callback.last_model_path, weights_only=True)["state_dict"]["actor.model.lm_head.weight"]
    assert exported.shape[0] > 0


def test_a_hub_that_refuses_fails_before_the_checkpoint_loads(tmp_path, monkeypatch):
    def refuse(self, repo_id, **kwargs):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    args = ["--ckpt_path", str(tmp_path / "no_such.ckpt"), "--export_dir", str(tmp_path / "out")]
    with pytest.raises(RuntimeError, match=r"--push_to_hub 'me/x'.*401 Unauthorized.*log in"):
        export([*args, "--push_to_hub", "me/x"])
    assert not (tmp_path / "out").exists()
