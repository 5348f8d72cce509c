"""Prompts for PPO: loading, chat templating, left truncation, and each rank's share per rollout."""

from __future__ import annotations

import logging
from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_rlhf.data.files import load_records, split_train_val

log = logging.getLogger(__name__)


class PromptRecord(NamedTuple):
    """One prompt: its text and every other field of its record (the reward's ``columns``)."""

    text: str
    columns: dict


class PromptDataModule(L.LightningDataModule):
    """Prompts from a local JSONL/JSON/Parquet/CSV file or a datasets-hub name.

    The training prompts are not a dataloader: the rollout callback asks for each rollout's prompts
    with :meth:`rollout_prompts`, a deterministic function of the rollout index (so resuming needs
    no iterator state). Validation prompts come through ``val_dataloader``. Every other field of a
    record (e.g. ``answer``) travels with its prompt to the reward as a column.

    Args:
        path: prompt file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) or a datasets-hub name.
        field: the record field that holds the prompt text.
        tokenizer_path: tokenizer to use; by default the PPO module's (its actor's) tokenizer.
        apply_chat_template: wrap each prompt as a user message with the tokenizer's chat template.
        max_prompt_len: prompts longer than this (in tokens) keep their last ``max_prompt_len``
            tokens; how many were cut is logged.
        val_path: held-out prompt file; without it ``val_size`` prompts are split off ``path``.
        val_size: number of prompts split off for validation when ``val_path`` is not given.
        val_batch_size: prompts per validation batch.
        split: dataset split name for hub datasets.
        seed: seed of the prompt order and the validation split.
    """

    def __init__(
        self,
        path: str,
        field: str = "prompt",
        tokenizer_path: str | None = None,
        apply_chat_template: bool = False,
        max_prompt_len: int = 256,
        val_path: str | None = None,
        val_size: int = 0,
        val_batch_size: int = 64,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_prompts: list[PromptRecord] = []
        self.val_prompts: list[PromptRecord] = []
        self.tokenizer = None
        self.truncated = 0

    def setup(self, stage: str) -> None:
        if self.train_prompts:
            return
        hp = self.hparams
        val = self._read(hp.val_path) if hp.val_path is not None else None
        self.train_prompts, self.val_prompts = split_train_val(self._read(hp.path), hp.path, val, hp.val_size, hp.seed)
        self.tokenizer = self._tokenizer()

    def _read(self, path: str) -> list[PromptRecord]:
        records = load_records(path, split=self.hparams.split)
        field = self.hparams.field
        if field not in records[0]:
            raise KeyError(f"prompt field {field!r} not found in {path!r}; its fields are {sorted(records[0])}")
        return [PromptRecord(str(r[field]), {k: v for k, v in r.items() if k != field}) for r in records]

    def _tokenizer(self):
        if self.hparams.tokenizer_path is not None:
            from lit_rlhf.models import load_tokenizer

            return load_tokenizer(self.hparams.tokenizer_path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or getattr(module, "tokenizer", None) is None:
            raise ValueError("PromptDataModule needs tokenizer_path, or a LightningModule with a tokenizer")
        return module.tokenizer

    def render(self, text: str) -> str:
        """The prompt as the policy sees it: the chat template applied (if set)."""
        if not self.hparams.apply_chat_template:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)

    def collate(self, records: list[PromptRecord]) -> dict:
        """A batch: left-padded ``input_ids``/``attention_mask``, the rendered ``prompts`` and ``columns``.

        Over-long prompts keep their last ``max_prompt_len`` tokens (counted in ``num_truncated``).
        """
        tok, max_len = self.tokenizer, self.hparams.max_prompt_len
        texts = [self.render(r.text) for r in records]
        if self.hparams.apply_chat_template:  # the template writes the special tokens itself
            ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
        else:
            ids = tok(texts).input_ids
        cut = sum(len(x) > max_len for x in ids)
        if cut:
            self.truncated += cut
            log.info("%d prompts longer than max_prompt_len=%d were left-truncated", cut, max_len)
        ids = [x[-max_len:] for x in ids]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            if x:
                input_ids[row, -len(x) :] = torch.tensor(x)
                attention_mask[row, -len(x) :] = 1
        names = list(records[0].columns) if records else []
        columns = {name: [r.columns.get(name) for r in records] for name in names}
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "num_truncated": torch.tensor(cut),
            "prompts": texts,
            "columns": columns,
        }

    def rollout_prompts(self, rollout: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        """This rank's ``batch_size`` prompts for rollout number ``rollout`` (a :meth:`collate` batch).

        All ranks walk one shuffled order of the prompts (reshuffled on every pass, seeded), each
        taking its own slice, so ``world_size`` ranks together see ``world_size * batch_size``
        distinct prompts per rollout.
        """
        n, per_rollout = len(self.train_prompts), batch_size * world_size
        if per_rollout > n:
            raise ValueError(f"a rollout needs {per_rollout} prompts but {self.hparams.path!r} has only {n}")
        per_pass = n // per_rollout
        epoch, slot = divmod(rollout, per_pass)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed * 7919 + epoch))
        start = slot * per_rollout + rank * batch_size
        return self.collate([self.train_prompts[i] for i in order[start : start + batch_size].tolist()])

    def train_dataloader(self) -> DataLoader:
        """PPO trains on its experience buffer, not on prompts: the module's loader is used."""
        return self.trainer.lightning_module.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_prompts, batch_size=self.hparams.val_batch_size, shuffle=False, collate_fn=self.collate
        )
