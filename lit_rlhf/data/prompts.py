"""Prompts for PPO: loading, chat templating, left truncation, and each rank's share per rollout."""

from __future__ import annotations

import logging
from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_rlhf.data.chat import DataError, Where, as_turns, check_template, render_prompt
from lit_rlhf.data.files import read_rows, split_train_val
from lit_rlhf.rewards.inputs import MissingColumn
from lit_rlhf.seeds import prompt_order_seed

# the column that carries each row's messages (before the chat template) to the rewards
MESSAGES_COLUMN = "prompt_messages"

log = logging.getLogger(__name__)


class PromptRecord(NamedTuple):
    """One prompt: the text the policy sees, its token ids, every other field of its record, and where it is.

    ``messages`` are the turns the chat template rendered (with an added system prompt), or None
    for a prompt used as raw text.
    """

    text: str
    ids: list[int]
    columns: dict
    messages: list[dict] | None = None
    path: str = ""
    row: int = 0


class PromptDataModule(L.LightningDataModule):
    """Prompts from a local JSONL/JSON/Parquet/CSV file or a datasets-hub name.

    A prompt is a plain string or a conversation (a list of ``{"role", "content"}`` messages); with
    ``apply_chat_template`` it is rendered with the tokenizer's chat template and the generation
    prompt (the assistant header), so the policy answers as the assistant. Every other field of a
    record (e.g. ``answer``) travels with its prompt to the rewards as a column (a row whose record
    lacks a field another row has is an error once a reward reads it, naming file and row), and so
    do the messages the template rendered (``prompt_messages``). Records are checked,
    rendered and tokenised in ``setup``, before any model is loaded; a bad one is named by file,
    row and field.

    The training prompts are not a dataloader: the rollout callback asks for each rollout's prompts
    with :meth:`rollout_prompts`, a deterministic function of the rollout index (so resuming needs
    no iterator state). Validation prompts come through ``val_dataloader``.

    Args:
        path: prompt file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) or a datasets-hub name.
        field: the record field that holds the prompt (a string, or a list of messages).
        tokenizer_path: tokenizer to use; by default the PPO module's (its actor's) tokenizer.
        apply_chat_template: render prompts with the tokenizer's chat template and the generation
            prompt; false keeps plain prompts as raw text.
        system_prompt: a system turn put before every prompt that has none (needs the chat template).
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
        system_prompt: str | None = None,
        max_prompt_len: int = 256,
        val_path: str | None = None,
        val_size: int = 0,
        val_batch_size: int = 64,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("max_prompt_len", max_prompt_len, 1), ("val_batch_size", val_batch_size, 1)):
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        if val_size < 0:
            raise ValueError(f"data.val_size must be >= 0, got {val_size}")
        if system_prompt is not None and not apply_chat_template:
            raise ValueError("data.system_prompt is a chat turn: it needs data.apply_chat_template: true")
        self.save_hyperparameters()
        self.train_prompts: list[PromptRecord] = []
        self.val_prompts: list[PromptRecord] = []
        self.tokenizer = None
        self.truncated = 0
        self.column_names: list[str] = []

    def setup(self, stage: str) -> None:
        if self.train_prompts:
            return
        hp = self.hparams
        self.tokenizer = self._tokenizer()
        check_template(self.tokenizer, hp.apply_chat_template)
        val = self._read(hp.val_path) if hp.val_path is not None else None
        self.train_prompts, self.val_prompts = split_train_val(self._read(hp.path), hp.path, val, hp.val_size, hp.seed)
        # every batch has every column of both files, so a row that lacks one is found (never a silent None)
        records = [*self.train_prompts, *self.val_prompts]
        self.column_names = list(dict.fromkeys(name for r in records for name in r.columns))

    def _read(self, path: str) -> list[PromptRecord]:
        """Every record of ``path`` checked, rendered and tokenised."""
        hp, rows = self.hparams, read_rows(path, split=self.hparams.split)
        texts, columns, messages = [], [], []
        for row, record in rows:
            where = Where(path, row, hp.field)
            if hp.field not in record:
                raise DataError(f"{where}: the prompt field is missing; the record's fields are {sorted(record)}")
            if MESSAGES_COLUMN in record and hp.field != MESSAGES_COLUMN:
                raise DataError(
                    f"{Where(path, row, MESSAGES_COLUMN)}: this name is reserved for the messages the rewards get; "
                    "rename the field"
                )
            value = record[hp.field]
            texts.append(render_prompt(self.tokenizer, value, where, hp.apply_chat_template, hp.system_prompt))
            messages.append(self._messages(value, where))
            columns.append({k: v for k, v in record.items() if k != hp.field})
        # the chat template writes the special tokens itself; raw text gets the tokenizer's (e.g. BOS)
        ids = self.tokenizer(texts, add_special_tokens=not hp.apply_chat_template).input_ids
        for (row, _), x in zip(rows, ids, strict=True):
            if not x:
                raise DataError(f"{Where(path, row, hp.field)}: the prompt is empty (no tokens)")
        return [
            PromptRecord(t, x, c, m, path, row)
            for t, x, c, m, (row, _) in zip(texts, ids, columns, messages, rows, strict=True)
        ]

    def _messages(self, value: str | list, where: Where) -> list[dict] | None:
        """The turns ``render_prompt`` renders (a string as a user turn, system prompt first); None for raw text."""
        hp = self.hparams
        if not hp.apply_chat_template:
            return None
        messages = as_turns(value, where, "user")
        if hp.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": hp.system_prompt}, *messages]
        return messages

    def _tokenizer(self):
        if self.hparams.tokenizer_path is not None:
            from lit_rlhf.models import load_tokenizer

            return load_tokenizer(self.hparams.tokenizer_path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or getattr(module, "tokenizer", None) is None:
            raise ValueError("PromptDataModule needs tokenizer_path, or a LightningModule with a tokenizer")
        return module.tokenizer

    def collate(self, records: list[PromptRecord], count: bool = True) -> dict:
        """A batch: left-padded ``input_ids``/``attention_mask``, the rendered ``prompts`` and ``columns``.

        ``columns`` has every field of the data files, a :class:`MissingColumn` where a row lacks
        one, and with the chat template ``prompt_messages`` (each row's turns before rendering).
        Over-long prompts keep their last ``max_prompt_len`` tokens (counted in ``num_truncated``, and
        unless ``count`` is false in the run's total).
        """
        max_len = self.hparams.max_prompt_len
        cut = sum(len(r.ids) > max_len for r in records)
        if cut and count:
            self.truncated += cut
            log.info("%d prompts longer than max_prompt_len=%d were left-truncated", cut, max_len)
        ids = [r.ids[-max_len:] for r in records]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, -len(x) :] = torch.tensor(x)
            attention_mask[row, -len(x) :] = 1
        names = self.column_names or list(dict.fromkeys(name for r in records for name in r.columns))
        columns = {
            name: [r.columns[name] if name in r.columns else MissingColumn(name, r.path, r.row) for r in records]
            for name in names
        }
        if self.hparams.apply_chat_template:
            columns[MESSAGES_COLUMN] = [r.messages for r in records]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "num_truncated": torch.tensor(cut),
            "prompts": [r.text for r in records],
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
        order = torch.randperm(n, generator=torch.Generator().manual_seed(prompt_order_seed(self.hparams.seed, epoch)))
        start = slot * per_rollout + rank * batch_size
        return self.collate([self.train_prompts[i] for i in order[start : start + batch_size].tolist()])

    def stream_prompts(self, positions: list[int], rank: int = 0, world_size: int = 1, count: bool = True) -> dict:
        """The prompts at ``positions`` of this rank's prompt stream (a :meth:`collate` batch), for
        asynchronous rollouts, which take new prompts as groups finish rather than a fixed slice per rollout.

        The stream walks the shuffled prompts pass after pass (each pass reshuffled, seeded, every prompt
        once per pass); rank ``r`` takes every ``world_size``-th prompt from ``r``, so the ranks never
        share one. ``count``: add over-long prompts to the run's truncation count (false for a batch
        collated again).
        """
        n = len(self.train_prompts)
        orders: dict[int, list[int]] = {}
        records = []
        for position in positions:
            epoch, slot = divmod(position * world_size + rank, n)
            if epoch not in orders:
                generator = torch.Generator().manual_seed(prompt_order_seed(self.hparams.seed, epoch))
                orders[epoch] = torch.randperm(n, generator=generator).tolist()
            records.append(self.train_prompts[orders[epoch][slot]])
        return self.collate(records, count)

    def train_dataloader(self) -> DataLoader:
        """PPO trains on its experience buffer, not on prompts: the module's loader is used."""
        return self.trainer.lightning_module.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_prompts, batch_size=self.hparams.val_batch_size, shuffle=False, collate_fn=self.collate
        )
