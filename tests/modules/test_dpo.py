"""DPOModule: the answer log-probs it trains on, its reference (frozen copy, cache, LoRA), resume,
settings and data errors, and learning through the real entry point."""

import math
import os
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from lit_rlhf import DPOModule, PreferenceDataModule
from lit_rlhf.data.chat import DataError
from lit_rlhf.data.sft import IGNORE_INDEX
from lit_rlhf.models import Actor
from lit_rlhf.modules.dpo_setup import answer_log_probs
from lit_rlhf.tasks.arithmetic import preference_records, split_problems, write_jsonl
from tests.test_cli import ROOT, run

SGD = {"optimizer": lambda p: torch.optim.SGD(p, lr=0.5), "max_grad_norm": None}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, str]:
    """The embedded task's preference pairs: (prompt, right answer, wrong answer), as the demo writes them."""
    root = tmp_path_factory.mktemp("pairs")
    splits = split_problems(0)
    files = {name: str(root / f"{name}.jsonl") for name in ("train", "val", "small")}
    write_jsonl(files["train"], preference_records(splits["train"], 256, 2))
    write_jsonl(files["val"], preference_records(splits["dev"], 32, 3))
    write_jsonl(files["small"], preference_records(splits["train"], 64, 4))
    return files


@pytest.fixture(scope="module")
def other_policy(tiny_assets, tmp_path_factory) -> str:
    """A policy with the tiny assets' tokenizer and architecture but other weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["policy"])
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("other") / "policy")
    model.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_assets["policy"]).save_pretrained(path)
    return path


def trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": L.pytorch.loggers.CSVLogger(str(tmp_path), name="logs"),
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def fit(module, data, tmp_path, **kwargs) -> pd.DataFrame:
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, **kwargs)
    t.fit(module, datamodule=data)
    return pd.read_csv(f"{t.logger.log_dir}/metrics.csv")


def attached(module, data: PreferenceDataModule) -> PreferenceDataModule:
    """A datamodule set up with the module's tokenizer, the way a Trainer does it."""
    t = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    t.strategy.connect(module)
    data.trainer = module.trainer = t
    data.setup("fit")
    module.configure_model()
    return data


# --- what the loss is computed from -----------------------------------------------------------


def test_answer_log_probs_are_the_answer_tokens_of_each_row_in_one_forward(tiny_assets, pairs):
    module = DPOModule(models={"path": tiny_assets["policy"]})
    data = attached(module, PreferenceDataModule(pairs["train"], batch_size=4))
    batch = data.collate(data.train_examples[:4])
    result = answer_log_probs(module.actor, batch)
    # by hand: each row alone, log-softmax of the next-token logits at every labelled position
    for row in range(8):
        n = int(batch["attention_mask"][row].sum())
        ids, labels = batch["input_ids"][row, :n], batch["labels"][row, :n]
        logits = module.actor.model(ids.unsqueeze(0)).logits[0].float()
        positions = [t for t in range(1, n) if labels[t] != IGNORE_INDEX]
        expected = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in positions)
        torch.testing.assert_close(result.sums[row], expected, atol=1e-5, rtol=1e-5)
        assert result.counts[row] == len(positions)
    # the answer is the completion plus EOS: "<bos>07+45=" is never scored
    record = data.train_records[0]
    assert int(result.counts[0]) == len(record["chosen"]) + 1 and int(result.counts[4]) == len(record["rejected"]) + 1


def test_conversational_pairs_train_the_assistant_turn_and_validate_from_the_generation_prompt(chatml_assets, tmp_path):
    """Explicit-prompt and implicit-prompt conversations (ChatML) give the same rows; the validation
    samples start right after ``<|im_start|>assistant\\n``, as the policy will be prompted."""
    import json

    from lit_rlhf.modules.dpo import validation_prompts

    user = {"role": "user", "content": "What is 2+3?"}
    good, bad = {"role": "assistant", "content": "It is 5."}, {"role": "assistant", "content": "8"}
    records = [
        {"prompt": [user], "chosen": [good], "rejected": [bad], "answer": "5"},
        {"chosen": [user, good], "rejected": [user, bad], "answer": "5"},
    ]
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    module = DPOModule(models={"path": chatml_assets["policy"]})
    data = attached(module, PreferenceDataModule(str(path), val_path=str(path), batch_size=2))
    batch = data.collate(data.train_examples)
    ids, labels = batch["input_ids"], batch["labels"]
    assert torch.equal(ids[0], ids[1]) and torch.equal(labels[2], labels[3])  # rows: chosen x2, rejected x2
    tok = module.tokenizer
    trained = [tok.decode(row[row != IGNORE_INDEX]) for row in batch["labels"][[0, 2]]]
    assert trained == ["It is 5.<|im_end|>", "8<|im_end|>"]  # the assistant turn and its end-of-turn token
    prompts, mask = validation_prompts(batch, tok.pad_token_id)
    texts = [tok.decode(row[m.bool()]) for row, m in zip(prompts, mask, strict=True)]
    assert texts == [tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)] * 2
    # through fit: the validation record's columns reach the metric (a missing ``answer`` would raise)
    module = DPOModule(
        models={"path": chatml_assets["policy"]},
        generation={"max_new_tokens": 4},
        val_metrics={"accuracy": "lit_rlhf.tasks.arithmetic.exact_match_reward"},
    )
    data = PreferenceDataModule(str(path), val_path=str(path), batch_size=2)
    frame = fit(module, data, tmp_path, max_steps=1, limit_val_batches=1.0)
    assert [c["answer"] for c in module.val_columns.values()] == ["5"]  # both records are the same pair
    assert frame["val/accuracy"].notna().sum() == 1 and frame["val/kl"].notna().sum() == 1


# --- the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["frozen copy, on the fly", "frozen copy, cached", "LoRA adapter disabled"])
def test_the_first_step_has_exactly_zero_rewards_and_loss_log_2(tiny_assets, pairs, reference, tmp_path):
    models = {"path": tiny_assets["policy"]}
    algorithm = {"reference_cache": reference.endswith("cached")}
    if reference.startswith("LoRA"):
        models["lora"] = {"rank": 4}
    module = DPOModule(models=models, algorithm=algorithm, optim=SGD)
    frame = fit(module, PreferenceDataModule(pairs["train"], batch_size=16), tmp_path, max_steps=2)
    first = frame.dropna(subset=["dpo/loss"]).iloc[0]
    assert (module.reference is None) == reference.startswith("LoRA")
    if reference.endswith("cached"):  # the cache's forwards batch other rows together: float noise only
        assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/margins"]) < 1e-6
    else:  # the same rows through the same weights: bit for bit
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
        assert first["rewards/accuracies"] == 0.0  # no pair is ranked yet
    assert math.isclose(first["dpo/loss"], math.log(2.0), abs_tol=1e-6)


def test_cached_and_on_the_fly_reference_give_the_same_losses(tiny_assets, pairs, tmp_path):
    losses = {}
    for cache in (True, False):
        module = DPOModule(
            models={"path": tiny_assets["policy"]},
            algorithm={"reference_cache": cache},
            optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3)},
        )
        data = PreferenceDataModule(pairs["train"], val_path=pairs["val"], batch_size=32)
        frame = fit(module, data, tmp_path / str(cache), max_epochs=2)
        losses[cache] = frame.dropna(subset=["dpo/loss"])[["dpo/loss", "rewards/margins"]].to_numpy()
        if cache:  # every distinct train and val answer row, computed once
            rows = {(tuple(e.chosen_ids), tuple(e.rejected_ids)) for e in [*data.train_examples, *data.val_examples]}
            assert 0 < len(module.reference_cache) <= 2 * len(rows)
    assert len(losses[True]) == 16  # 256 pairs / 32 x 2 epochs
    assert abs(losses[True][-1, 1]) > 0.01, "training moved the policy away from the reference"
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), atol=1e-5, rtol=1e-5)


def test_a_separate_reference_model_is_frozen_and_used(tiny_assets, other_policy, pairs, tmp_path):
    module = DPOModule(
        models={"path": tiny_assets["policy"], "reference_path": other_policy},
        algorithm={"reference_cache": False},
        optim=SGD,
    )
    data = attached(module, PreferenceDataModule(pairs["train"], batch_size=8))
    batch = data.collate(data.train_examples[:8])
    other = Actor.from_pretrained(other_policy, module.tokenizer)
    loss, metrics = module.preference_loss(batch)
    policy, reference = answer_log_probs(module.actor, batch), answer_log_probs(other, batch)
    expected = 0.1 * (policy.sums - reference.sums).detach()
    torch.testing.assert_close(metrics["rewards/chosen"], expected[:8].mean(), atol=1e-5, rtol=1e-5)
    before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    fit(module, PreferenceDataModule(pairs["train"], batch_size=16), tmp_path, max_steps=3)
    assert all(torch.equal(before[k], v) for k, v in module.reference.state_dict().items())
    assert not any(p.requires_grad for p in module.reference.parameters())


@pytest.mark.parametrize("cache", [False, True])
def test_lora_reference_is_the_policy_with_its_adapter_disabled(tiny_assets, pairs, tmp_path, cache):
    module = DPOModule(
        models={"path": tiny_assets["policy"], "lora": {"rank": 4, "alpha": 8}},
        algorithm={"reference_cache": cache},
        optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2)},
    )
    data = PreferenceDataModule(pairs["train"], batch_size=16)
    frame = fit(module, data, tmp_path, max_steps=6)
    assert module.reference is None and module.caches_reference == cache
    base = Actor.from_pretrained(tiny_assets["policy"], module.tokenizer)
    batch = data.collate(data.train_examples[:8])
    with module.actor.adapter_disabled():  # the base weights never trained
        torch.testing.assert_close(answer_log_probs(module.actor, batch).sums, answer_log_probs(base, batch).sums)
    trained = answer_log_probs(module.actor, batch).sums
    assert (trained - answer_log_probs(base, batch).sums).abs().max() > 1e-3, "the adapter trained"
    # so the logged rewards are beta * (policy with adapter - base policy)
    _, metrics = module.preference_loss(batch)
    torch.testing.assert_close(
        metrics["rewards/chosen"], 0.1 * (trained - answer_log_probs(base, batch).sums)[:8].mean(), atol=1e-5, rtol=1e-5
    )
    assert frame["rewards/chosen"].dropna().iloc[0] == 0.0 and frame["rewards/chosen"].dropna().iloc[-1] != 0.0


# --- variants -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_each_loss_gets_the_log_probs_its_formula_names(tiny_assets, other_policy, pairs, loss_type):
    """sigmoid and hinge: summed answer log-probs; ipo: per-token averages (as TRL); SimPO: averages, no reference."""
    simpo = loss_type == "simpo"
    module = DPOModule(
        models={"path": tiny_assets["policy"], "reference_path": None if simpo else other_policy},
        algorithm={"reference_free": True, "beta": 2.0, "gamma": 0.5}
        if simpo
        else {"loss_type": loss_type, "beta": 0.5, "reference_cache": False},
    )
    data = attached(module, PreferenceDataModule(pairs["train"], batch_size=8))
    batch = data.collate(data.train_examples[:8])
    loss, metrics = module.preference_loss(batch)
    policy = answer_log_probs(module.actor, batch)
    average = loss_type in ("ipo", "simpo")
    values = policy.sums / policy.counts if average else policy.sums
    if simpo:
        z = 2.0 * (values[:8] - values[8:]) - 0.5
        expected = torch.nn.functional.softplus(-z).mean()  # -log sigmoid(z)
    else:
        reference = answer_log_probs(Actor.from_pretrained(other_policy, module.tokenizer), batch)
        ref_values = reference.sums / reference.counts if average else reference.sums
        h = (values[:8] - ref_values[:8]) - (values[8:] - ref_values[8:])
        expected = {
            "sigmoid": torch.nn.functional.softplus(-0.5 * h),
            "ipo": (h - 1 / (2 * 0.5)) ** 2,
            "hinge": torch.relu(1 - 0.5 * h),
        }[loss_type].mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["logps/chosen"], policy.sums[:8].mean().detach())
    assert loss.requires_grad and (module.reference is None) == simpo


@pytest.mark.parametrize(
    "algorithm",
    [
        {"loss_type": "ipo", "beta": 0.5},
        {"loss_type": "hinge"},
        {"label_smoothing": 0.1},
        {"reference_free": True, "beta": 2.0, "gamma": 0.5},
    ],
    ids=["ipo", "hinge", "label_smoothing", "simpo"],
)
def test_every_loss_variant_trains_the_margin_up(tiny_assets, pairs, tmp_path, algorithm):
    module = DPOModule(
        models={"path": tiny_assets["policy"]},
        algorithm=algorithm,
        optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3)},
    )
    frame = fit(module, PreferenceDataModule(pairs["small"], batch_size=16), tmp_path, max_epochs=4)
    assert (module.reference is None) == algorithm.get("reference_free", False)
    margins = frame["rewards/margins"].dropna().tolist()
    losses = frame["dpo/loss"].dropna().tolist()
    assert sum(margins[-4:]) / 4 > sum(margins[:4]) / 4 + 0.01, margins
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


# --- resume -------------------------------------------------------------------------------------


def test_resume_gives_the_same_subsequent_losses(tiny_assets, pairs, tmp_path):
    def module():
        return DPOModule(
            models={"path": tiny_assets["policy"]},
            optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3), "warmup_steps": 3, "lr_decay": "cosine"},
        )

    def data():
        return PreferenceDataModule(pairs["train"], batch_size=64)

    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1)
    full = fit(module(), data(), tmp_path / "full", max_epochs=3, callbacks=[every_epoch], enable_checkpointing=True)
    first_epoch = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))[0]
    L.seed_everything(123, verbose=False)  # a different process state: nothing may depend on it
    t = trainer(tmp_path / "resumed", max_epochs=3)
    t.fit(module(), datamodule=data(), ckpt_path=str(first_epoch))
    resumed = pd.read_csv(f"{t.logger.log_dir}/metrics.csv")
    a = full.dropna(subset=["dpo/loss"])
    b = resumed.dropna(subset=["dpo/loss"])
    assert len(a) == 12 and b["epoch"].tolist() == [1] * 4 + [2] * 4
    for key in ("dpo/loss", "rewards/margins", "rewards/accuracies"):
        assert a[a.epoch >= 1][key].tolist() == b[key].tolist(), key  # bit-identical, not approximately


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
    with pytest.raises(ValueError, match="models.reference_path .* has another tokenizer than models.path"):
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
    assert len(accuracies) == 60 and accuracies[0] == 0.0  # the first step: policy = reference, no pair ranked
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
