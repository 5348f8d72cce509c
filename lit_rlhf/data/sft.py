"""SFT pairs (prompt, response) and preference pairs (prompt, chosen, rejected): tokenising and batching."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_rlhf.data.files import load_records, split_train_val

IGNORE_INDEX = -100


def encode_pair(tokenizer, prompt: str, response: str, apply_chat_template: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``response`` (ending with EOS), as the policy sees them."""
    if apply_chat_template:
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False)
        full_text = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
        return prompt_ids, full_ids[len(prompt_ids) :]
    prompt_ids = tokenizer(prompt).input_ids
    return prompt_ids, tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def pad_right(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class PairDataModule(L.LightningDataModule):
    """Base for file-backed datasets of text records, tokenised with the module's tokenizer.

    Args:
        path: training records (``.jsonl``/``.json``/``.parquet``/``.csv`` or a hub dataset).
        val_path: held-out records; without it ``val_size`` records are split off ``path``.
        val_size: records split off for validation when ``val_path`` is not given.
        batch_size: records per training batch.
        apply_chat_template: render prompts and responses with the tokenizer's chat template.
        max_length: longer examples keep their first ``max_length`` tokens.
        seed: seed of the shuffling and the validation split.
    """

    fields: tuple[str, ...] = ()

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_size: int = 0,
        batch_size: int = 64,
        apply_chat_template: bool = True,
        max_length: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []

    def setup(self, stage: str) -> None:
        if self.train_records:
            return
        hp = self.hparams
        val = self._read(hp.val_path) if hp.val_path is not None else None
        self.train_records, self.val_records = split_train_val(self._read(hp.path), hp.path, val, hp.val_size, hp.seed)
        # tokenised once here, not in every batch's collate
        self.train_examples = [self.encode(r) for r in self.train_records]
        self.val_examples = [self.encode(r) for r in self.val_records]

    def _read(self, path: str) -> list[dict]:
        records = load_records(path)
        missing = [f for f in self.fields if f not in records[0]]
        if missing:
            raise KeyError(f"fields {missing} not found in {path!r}; its fields are {sorted(records[0])}")
        return records

    @property
    def tokenizer(self):
        return self.trainer.lightning_module.tokenizer

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.train_examples, self.hparams.batch_size, shuffle=True, collate_fn=self.collate, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, self.hparams.batch_size, collate_fn=self.collate)


class SFTDataModule(PairDataModule):
    """Records with ``prompt`` and ``response``; batches carry ``labels`` with the prompt masked.

    Args:
        path: training records (``.jsonl``/``.json``/``.parquet``/``.csv`` or a hub dataset).
        val_path: held-out records; without it ``val_size`` records are split off ``path``.
        val_size: records split off for validation when ``val_path`` is not given.
        batch_size: records per training batch.
        apply_chat_template: render prompts and responses with the tokenizer's chat template.
        max_length: longer examples keep their first ``max_length`` tokens (and the row length when packing).
        packing: concatenate short examples into rows of up to ``max_length`` tokens; position ids
            restart at every example, so attention never crosses an example boundary.
        seed: seed of the shuffling and the validation split.
    """

    fields = ("prompt", "response")

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_size: int = 0,
        batch_size: int = 64,
        apply_chat_template: bool = True,
        max_length: int = 256,
        packing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(path, val_path, val_size, batch_size, apply_chat_template, max_length, seed)
        self.save_hyperparameters()

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` with the prompt's labels set to ``IGNORE_INDEX``."""
        hp = self.hparams
        prompt_ids, response_ids = encode_pair(
            self.tokenizer, record["prompt"], record["response"], hp.apply_chat_template
        )
        ids = (prompt_ids + response_ids)[: hp.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: hp.max_length]
        return ids, labels

    def collate(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        pad_id = self.tokenizer.pad_token_id
        return pack(examples, self.hparams.max_length, pad_id) if self.hparams.packing else pad(examples, pad_id)


def pad(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """One example per row, right-padded."""
    input_ids = pad_right([ids for ids, _ in examples], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": pad_right([[1] * len(ids) for ids, _ in examples], 0),
        "labels": pad_right([labels for _, labels in examples], IGNORE_INDEX),
    }


def pack(examples: list[tuple[list[int], list[int]]], max_length: int, pad_id: int) -> dict[str, Tensor]:
    """Greedy packing into rows of at most ``max_length``; ``position_ids`` restart per example.

    No ``attention_mask`` is returned: transformers reads example boundaries from the position ids.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for ids, labels in examples:
        if not rows or len(rows[-1][0]) + len(ids) > max_length:
            rows.append(([], [], []))
        rows[-1][0].extend(ids)
        rows[-1][1].extend(labels)
        rows[-1][2].extend(range(len(ids)))
    width = max(len(r[0]) for r in rows)
    tail = [width - len(r[0]) for r in rows]
    return {
        "input_ids": torch.tensor([r[0] + [pad_id] * t for r, t in zip(rows, tail, strict=True)]),
        "labels": torch.tensor([r[1] + [IGNORE_INDEX] * t for r, t in zip(rows, tail, strict=True)]),
        "position_ids": torch.tensor([r[2] + list(range(t)) for r, t in zip(rows, tail, strict=True)]),
    }


class PreferenceDataModule(PairDataModule):
    """Records with ``prompt``, ``chosen`` and ``rejected`` responses, for reward-model training.

    A batch of ``B`` pairs is ``input_ids``/``attention_mask`` of ``2B`` right-padded rows: the
    chosen responses, then the rejected ones in the same order.
    """

    fields = ("prompt", "chosen", "rejected")

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """Token ids of ``prompt + chosen`` and of ``prompt + rejected``."""
        hp, rows = self.hparams, []
        for side in ("chosen", "rejected"):
            prompt_ids, response_ids = encode_pair(
                self.tokenizer, record["prompt"], record[side], hp.apply_chat_template
            )
            rows.append((prompt_ids + response_ids)[: hp.max_length])
        return rows[0], rows[1]

    def collate(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        rows = [chosen for chosen, _ in examples] + [rejected for _, rejected in examples]
        mask = pad_right([[1] * len(x) for x in rows], 0)
        return {"input_ids": pad_right(rows, self.tokenizer.pad_token_id), "attention_mask": mask}
