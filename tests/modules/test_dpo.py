"""DPOModule: the answer log-probs it trains on, its reference (frozen copy, cache, LoRA), the loss
variants and resume. Settings and data errors and the real entry point: test_dpo_entry.py."""

import math

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf import DPOModule, PreferenceDataModule
from lit_rlhf.data.sft import IGNORE_INDEX
from lit_rlhf.models import Actor
from lit_rlhf.modules.dpo_setup import answer_log_probs
from tests.dpo_kit import SGD, attached, fit, trainer

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
    # the first step: policy = reference, up to the float noise of two forwards batched differently
    # (bitwise 0 on AVX512 kernels, about 6e-9 on AVX2-only CPUs)
    assert (
        abs(frame["rewards/chosen"].dropna().iloc[0]) < 1e-6 and abs(frame["rewards/chosen"].dropna().iloc[-1]) > 1e-5
    )


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
            optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3), "warmup_steps": 3, "lr_scheduler": "cosine"},
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
