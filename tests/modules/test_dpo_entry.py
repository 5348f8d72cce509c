"""DPOModule's errors (settings, data, mismatched models) and learning through the real entry point."""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lit_rlhf import DPOModule, PreferenceDataModule
from lit_rlhf.data.chat import DataError
from tests.dpo_kit import attached, trainer
from tests.test_cli import ROOT, run

# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"algorithm": {"loss_type": "kto"}}, "unknown algorithm.loss_type 'kto'; valid: sigmoid, ipo, hinge"),
        ({"algorithm": {"beta": 0.0}}, "algorithm.beta must be > 0, got 0.0"),
        ({"algorithm": {"beta": -1}}, "algorithm.beta must be > 0"),
        ({"algorithm": {"label_smoothing": 0.5}}, "algorithm.label_smoothing must be in \\[0, 0.5\\), got 0.5"),
        ({"algorithm": {"label_smoothing": -0.1}}, "algorithm.label_smoothing must be in \\[0, 0.5\\)"),
        (
            {"algorithm": {"loss_type": "ipo", "label_smoothing": 0.1}},
            "label_smoothing is defined for the sigmoid loss only; with loss_type='ipo' set it to 0",
        ),
        ({"algorithm": {"loss_type": "hinge", "label_smoothing": 0.1}}, "with loss_type='hinge' set it to 0"),
        ({"algorithm": {"reference_free": True, "loss_type": "ipo"}}, "reference_free \\(SimPO\\) uses the sigmoid"),
        (
            {"algorithm": {"reference_free": True, "reference_cache": True}},
            "reference_free uses no reference log-probs: leave algorithm.reference_cache null",
        ),
        ({"algorithm": {"gamma": 0.5}}, "algorithm.gamma \\(0.5\\) is SimPO's margin .* turn reference_free on"),
        ({"algorithm": {"reference_free": True, "gamma": -1.0}}, "algorithm.gamma must be >= 0"),
        (
            {"algorithm": {"reference_free": True}, "models": {"path": "x", "reference_path": "y"}},
            "reference_free uses no reference model, but models.reference_path is set",
        ),
        ({"models": {"path": "x", "reference_path": ""}}, "models.reference_path must be a model directory"),
        ({"models": {"path": ""}}, "models.path must be a model directory or hub id"),
    ],
)
def test_bad_settings_are_named_before_anything_loads(settings, message):
    settings = {"models": {"path": "no/such/model"}, **settings}
    with pytest.raises(ValueError, match=message):
        DPOModule(**settings)


def test_bad_data_and_mismatched_models_are_named(tiny_assets, chatml_assets, pairs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "01+02=", "chosen": "3", "rejected": "4"}\n{"prompt": "01+03=", "chosen": "4"}\n')
    module = DPOModule(models={"path": tiny_assets["policy"]})
    with pytest.raises(DataError, match=f"{bad}, row 2, field 'rejected': the field is missing"):
        trainer(tmp_path).fit(module, datamodule=PreferenceDataModule(str(bad)))
    assert module.actor is None, "the data is checked before any model loads"
    mismatched = DPOModule(models={"path": tiny_assets["policy"], "reference_path": chatml_assets["policy"]})
    with pytest.raises(
        ValueError, match="models.reference_path would start from .* whose tokenizer differs from the actor's"
    ):
        trainer(tmp_path).fit(mismatched, datamodule=PreferenceDataModule(pairs["small"]))
    # the cache holds the datamodule's examples: batches from a bare dataloader need reference_cache: false
    cached = DPOModule(models={"path": tiny_assets["policy"]})
    data = attached(cached, PreferenceDataModule(pairs["small"], batch_size=8))
    loader = torch.utils.data.DataLoader(data.train_examples, batch_size=8, collate_fn=data.collate)
    with pytest.raises(ValueError, match="set algorithm.reference_cache: false"):
        trainer(tmp_path, max_steps=1).fit(cached, train_dataloaders=loader)


# --- through the real entry point ---------------------------------------------------------------


@pytest.mark.slow
def test_cli_fit_learns_the_pairs_validates_exports_and_resumes(tiny_assets, pairs, tmp_path):
    """configs/dpo_tiny.yaml on the tiny assets: rewards/accuracies above 0.9, val/* logged, export, resume."""
    root = tmp_path / "runs"
    override = {
        "trainer": {
            "default_root_dir": str(root),
            "max_steps": 60,
            "val_check_interval": 30,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": [],  # only the CSV log every run keeps
        },
        "model": {
            "init_args": {
                "models": {"path": tiny_assets["policy"]},
                "optim": {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3.0e-3}}},
            }
        },
        "data": {"init_args": {"path": pairs["small"], "val_path": pairs["val"], "batch_size": 16}},
    }
    root.mkdir()
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    base = ["--config", os.path.join(ROOT, "configs", "dpo_tiny.yaml"), "--config", str(root / "override.yaml")]
    run(["fit", *base], tmp_path)
    run_dir = root / "version_0"
    frame = pd.read_csv(run_dir / "metrics.csv")
    accuracies = frame["rewards/accuracies"].dropna().tolist()
    assert len(accuracies) == 60
    # the first step: policy = reference, so no margin beyond float noise (pairs "ranked" by a 1e-9
    # difference between two forwards batched differently count in rewards/accuracies on AVX2 CPUs)
    assert abs(frame["rewards/margins"].dropna().iloc[0]) < 1e-6
    assert sum(accuracies[-10:]) / 10 > 0.9, accuracies
    validated = frame.dropna(subset=["val/loss"])
    assert len(validated) == 2
    for key in ("val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen", "val/kl", "val/accuracy"):
        assert validated[key].notna().all(), key
    assert validated["val/kl"].iloc[-1] > 0, "the sampled responses moved away from the reference"
    # the export: a plain causal LM with the checkpoint's weights
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(exported.lm_head.weight, state["actor.model.lm_head.weight"])
    assert not any(k.startswith("reference.") for k in state), "the frozen reference is not stored"
    out = run(["export", *base, "--ckpt_path", str(ckpt), "--export_dir", str(tmp_path / "exported")], tmp_path)
    assert "exported policy" in out.stdout
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    torch.testing.assert_close(again.lm_head.weight, exported.lm_head.weight)
    # resume from the checkpoint for 30 more steps: the run folder continues
    run(["fit", *base, "--trainer.max_steps", "90", "--ckpt_path", str(ckpt)], tmp_path)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["version_0"]
    assert Path(run_dir / "metrics.csv").read_text().count("\n") > len(frame)
