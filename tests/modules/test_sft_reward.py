"""SFTModule (response-only loss, packing, learning) and RewardModelModule (Bradley-Terry)."""

import json
import math

import lightning as L
import pytest
import torch

from lit_rlhf import PreferenceDataModule, RewardModelModule, SFTDataModule, SFTModule
from lit_rlhf.data.sft import IGNORE_INDEX
from lit_rlhf.modules.reward import bradley_terry_loss
from lit_rlhf.tasks.arithmetic import preference_records, sft_records, split_problems, write_jsonl


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    splits = split_problems(0)
    files = {
        "sft": str(root / "sft.jsonl"),
        "sft_val": str(root / "sft_val.jsonl"),
        "pairs": str(root / "pairs.jsonl"),
        "pairs_val": str(root / "pairs_val.jsonl"),
    }
    write_jsonl(files["sft"], sft_records(splits["train"], 2048, 0.0, 0))
    write_jsonl(files["sft_val"], sft_records(splits["dev"], 128, 0.0, 1))
    write_jsonl(files["pairs"], preference_records(splits["train"], 2048, 2))
    write_jsonl(files["pairs_val"], preference_records(splits["dev"], 256, 3))
    return files


def attach(datamodule, module):
    """Give a datamodule the module's tokenizer the way a Trainer would, and set it up."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    datamodule.trainer = trainer
    module.trainer = trainer
    datamodule.setup("fit")
    return datamodule


def test_sft_labels_mask_the_prompt_and_loss_counts_only_the_response(tiny_assets, task_files):
    module = SFTModule(models={"path": tiny_assets["policy"]})
    module.configure_model()
    dm = attach(SFTDataModule(task_files["sft"], batch_size=4), module)
    record = dm.train_records[0]
    ids, labels = dm.train_examples[0]
    tok = module.tokenizer
    # "<bos>07+45=" is the prompt: its labels are ignored; the answer and EOS are learned
    prompt_text = tok.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False)
    prompt_len = len(tok(prompt_text, add_special_tokens=False).input_ids)
    assert prompt_text == "<bos>" + record["prompt"]
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tok.decode(ids[prompt_len:]) == record["response"] + tok.eos_token
    batch = dm.collate(dm.train_examples[:4])
    loss, _ = module.loss(batch)
    logits = module.actor.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    manual = [
        -torch.log_softmax(logits[b, t], -1)[targets[b, t]]
        for b in range(4)
        for t in range(targets.shape[1])
        if targets[b, t] != IGNORE_INDEX
    ]
    torch.testing.assert_close(loss, torch.stack(manual).mean(), atol=1e-5, rtol=1e-5)
    # prompt tokens carry no loss: changing every prompt label target leaves the loss unchanged
    assert len(manual) == sum(len(dm.train_examples[i][0]) - prompt_len for i in range(4))


def test_packed_batches_give_the_padded_loss(tiny_assets, task_files):
    module = SFTModule(models={"path": tiny_assets["policy"]})
    module.configure_model()
    padded = attach(SFTDataModule(task_files["sft"], batch_size=8), module)
    packed = attach(SFTDataModule(task_files["sft"], batch_size=8, packing=True, max_length=40), module)
    examples = padded.train_examples[:8]
    packed_batch = packed.collate(examples)
    assert packed_batch["input_ids"].shape[0] < 8, "several examples share a row"
    loss_padded, acc_padded = module.loss(padded.collate(examples))
    loss_packed, acc_packed = module.loss(packed_batch)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc_packed, acc_padded)


@pytest.mark.slow
def test_sft_loss_falls(tiny_assets, task_files, tmp_path):
    L.seed_everything(0, verbose=False)
    module = SFTModule(
        models={"path": tiny_assets["policy"]}, optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3)}
    )
    trainer = L.Trainer(
        max_steps=60,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=SFTDataModule(task_files["sft"], batch_size=64))
    import pandas as pd

    losses = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")["sft/loss"].dropna().tolist()
    assert losses[-1] < 0.7 * losses[0], losses


def test_bradley_terry_loss_formula():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    # a margin asks for a larger gap: 2 - 1 - 0.5 = .5
    torch.testing.assert_close(
        bradley_terry_loss(chosen[:1], rejected[:1], 0.5), torch.tensor(math.log(1 + math.exp(-0.5)))
    )


def test_preference_batch_stacks_chosen_then_rejected(tiny_assets, task_files):
    module = RewardModelModule(models={"path": tiny_assets["policy"]})
    dm = attach(PreferenceDataModule(task_files["pairs"], batch_size=4), module)
    batch = dm.collate(dm.train_examples[:3])
    assert batch["input_ids"].shape[0] == 6
    texts = module.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    records = dm.train_records[:3]
    assert texts == [r["prompt"] + r["chosen"] for r in records] + [r["prompt"] + r["rejected"] for r in records]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
