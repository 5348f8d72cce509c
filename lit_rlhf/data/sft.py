"""SFT examples and preference pairs: the formats TRL's and OpenRLHF's users have, tokenised once.

SFT records are prompt-completion pairs (``prompt`` + ``completion``, each a string or a list of
messages) or whole conversations (``messages``: every assistant turn is trained). Preference
records have an explicit ``prompt`` with ``chosen``/``rejected`` answers, or ``chosen``/``rejected``
conversations that share their prompt turns. Field names are settings.
"""

from __future__ import annotations

from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_rlhf.data.chat import (
    IGNORE_INDEX,
    DataError,
    Where,
    as_messages,
    as_text,
    as_turns,
    check_template,
    conversation_ids,
    is_conversation,
    plain_ids,
    render,
    split_shared_prompt,
)
from lit_rlhf.data.files import read_rows, split_train_val
from lit_rlhf.data.pairs import check_answers, check_identical, first_difference

__all__ = ["IGNORE_INDEX", "PairDataModule", "PreferenceDataModule", "SFTDataModule"]


def pad_right(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class PairDataModule(L.LightningDataModule):
    """Base for file-backed datasets of text records, tokenised with the module's tokenizer in ``setup``.

    Subclasses implement ``encode(record, path, row)`` and ``collate(examples)``.

    Args:
        path: training records (``.jsonl``/``.json``/``.parquet``/``.csv`` or a hub dataset).
        val_path: held-out records; without it ``val_size`` records are split off ``path``.
        val_size: records split off for validation when ``val_path`` is not given.
        batch_size: records per training batch.
        apply_chat_template: render records with the tokenizer's chat template (conversations need it).
        max_length: longer examples keep their first ``max_length`` tokens.
        seed: seed of the shuffling and the validation split.
    """

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
        if batch_size < 1 or max_length < 1 or val_size < 0:
            raise ValueError(
                f"data.batch_size and data.max_length must be >= 1 and data.val_size >= 0, "
                f"got {batch_size}, {max_length}, {val_size}"
            )
        self.save_hyperparameters()
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []
        self.generator: torch.Generator | None = None  # the training batches' shuffling
        self._restored_generator: Tensor | None = None  # its state from a checkpoint, for the next loader

    def setup(self, stage: str) -> None:
        if self.train_records:
            return
        hp = self.hparams
        check_template(self.tokenizer, hp.apply_chat_template)
        train = self._read(hp.path)
        val = self._read(hp.val_path) if hp.val_path is not None else None
        train, val = split_train_val(train, hp.path, val, hp.val_size, hp.seed)
        self.train_records, self.train_examples = [r for r, _ in train], [e for _, e in train]
        self.val_records, self.val_examples = [r for r, _ in val], [e for _, e in val]

    def _read(self, path: str) -> list[tuple[dict, tuple]]:
        """``(record, example)`` for every record: checked and tokenised once, here."""
        return [(record, self.encode(record, path, row)) for row, record in read_rows(path)]

    def encode(self, record: dict, path: str, row: int) -> tuple:
        """One record's checked, tokenised example; each data module (SFT, preference pairs) implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    def truncate(self, ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int]]:
        """The first ``max_length`` tokens; an example left with nothing to train on is an error."""
        max_length = self.hparams.max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{where}: max_length={max_length} leaves no response token to train on")
        return ids, labels

    @property
    def tokenizer(self):
        return self.trainer.lightning_module.tokenizer

    def train_dataloader(self) -> DataLoader:
        self.generator = torch.Generator().manual_seed(self.hparams.seed)
        if self._restored_generator is not None:
            self.generator.set_state(self._restored_generator)
            self._restored_generator = None
        return DataLoader(
            self.train_examples,
            self.hparams.batch_size,
            shuffle=True,
            collate_fn=self.collate,
            generator=self.generator,
        )

    def state_dict(self) -> dict:
        """The shuffling generator's state (Lightning stores it in checkpoints), so that a resumed run
        draws the batches the uninterrupted run would have drawn."""
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_generator = state_dict.get("generator")

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, self.hparams.batch_size, collate_fn=self.collate)


def completion_ids(
    tokenizer, prompt, completion, prompt_where: Where, completion_where: Where, apply_chat_template: bool
) -> tuple[list[int], list[int]]:
    """Ids and labels of a prompt (string or messages) followed by a completion (string or messages).

    Only the completion's tokens are labelled (with the chat template: its assistant turns up to
    and including their end-of-turn token).
    """
    if not apply_chat_template:
        if is_conversation(prompt) or is_conversation(completion):
            raise DataError(f"{prompt_where}: a conversation needs apply_chat_template: true to be rendered")
        return plain_ids(tokenizer, as_text(prompt, prompt_where), as_text(completion, completion_where))
    prompt_turns = as_turns(prompt, prompt_where, "user")
    completion_turns = as_turns(completion, completion_where, "assistant")
    if completion_turns[0]["role"] != "assistant":
        raise DataError(f"{completion_where}: the completion must start with an assistant turn")
    render(tokenizer, prompt_turns, prompt_where, add_generation_prompt=True)  # a template error names the prompt
    return conversation_ids(tokenizer, prompt_turns + completion_turns, completion_where, len(prompt_turns))


class SFTDataModule(PairDataModule):
    """Supervised examples; batches carry ``labels`` with everything but the response masked.

    A record is either a conversation (``messages_field``, a list of messages: every assistant turn
    is trained, each up to and including its end-of-turn token) or a prompt-completion pair
    (``prompt_field`` + ``completion_field``, each a string or a list of messages: only the
    completion is trained). Without the chat template, plain ``prompt + completion + EOS``.

    Args:
        path: training records (``.jsonl``/``.json``/``.parquet``/``.csv`` or a hub dataset).
        prompt_field: the prompt of a prompt-completion record.
        completion_field: the completion of a prompt-completion record (None = ``completion``, or
            ``response`` when the records have no ``completion`` field).
        messages_field: the conversation of a conversational record.
        val_path: held-out records; without it ``val_size`` records are split off ``path``.
        val_size: records split off for validation when ``val_path`` is not given.
        batch_size: records per training batch.
        apply_chat_template: render records with the tokenizer's chat template.
        max_length: longer examples keep their first ``max_length`` tokens (and the row length when packing).
        packing: concatenate short examples into rows of up to ``max_length`` tokens; position ids
            restart at every example, so attention never crosses an example boundary.
        seed: seed of the shuffling and the validation split.
    """

    def __init__(
        self,
        path: str,
        prompt_field: str = "prompt",
        completion_field: str | None = None,
        messages_field: str = "messages",
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

    def encode(self, record: dict, path: str, row: int) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` with every token but the trained response's set to ``IGNORE_INDEX``."""
        hp, tok = self.hparams, self.tokenizer
        if hp.messages_field in record:
            where = Where(path, row, hp.messages_field)
            if not hp.apply_chat_template:
                raise DataError(f"{where}: a conversation needs apply_chat_template: true to be rendered")
            tools = record.get("tools")  # TRL's column: the JSON schemas of the conversation's tools
            if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
                raise DataError(f"{Where(path, row, 'tools')}: expected a list of JSON tool schemas, got {tools!r:.80}")
            ids, labels = conversation_ids(tok, as_messages(record[hp.messages_field], where), where, tools=tools)
        elif hp.prompt_field in record:
            field = hp.completion_field or ("completion" if "completion" in record else "response")
            where = Where(path, row, field)
            if field not in record:
                raise DataError(f"{where}: the completion field is missing; the record's fields are {sorted(record)}")
            prompt_where = Where(path, row, hp.prompt_field)
            ids, labels = completion_ids(
                tok, record[hp.prompt_field], record[field], prompt_where, where, hp.apply_chat_template
            )
        else:
            raise DataError(
                f"{path}, row {row}: a record needs {hp.messages_field!r} (a conversation) or "
                f"{hp.prompt_field!r} and a completion; its fields are {sorted(record)}"
            )
        return self.truncate(ids, labels, f"{path}, row {row}")

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


class PreferenceExample(NamedTuple):
    """A tokenised pair: ids and labels (the answer's tokens; the rest ``IGNORE_INDEX``) of each side."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


class PreferenceDataModule(PairDataModule):
    """Preference pairs for the reward model (and DPO): a prompt with a chosen and a rejected answer.

    A record has an explicit prompt (``prompt_field``: a string or messages) with ``chosen`` and
    ``rejected`` answers (strings or assistant messages), or no prompt field and ``chosen``/
    ``rejected`` conversations that share their prompt turns (implicit prompt). A batch of ``B``
    pairs is ``2B`` right-padded rows: the chosen sequences, then the rejected ones in the same
    order; ``labels`` mark each row's answer tokens.

    Args:
        path: training records (``.jsonl``/``.json``/``.parquet``/``.csv`` or a hub dataset).
        prompt_field: the explicit prompt (absent: the prompt is the turns chosen and rejected share).
        chosen_field: the preferred answer (or conversation).
        rejected_field: the other answer (or conversation).
        val_path: held-out records; without it ``val_size`` records are split off ``path``.
        val_size: records split off for validation when ``val_path`` is not given.
        batch_size: pairs per training batch.
        apply_chat_template: render records with the tokenizer's chat template.
        max_length: longer sequences keep their first ``max_length`` tokens.
        seed: seed of the shuffling and the validation split.
        max_identical_fraction: pairs whose chosen and rejected token ids are identical after
            truncation to ``max_length`` (the answers differ only past it) teach nothing and are
            dropped with a warning that counts them; more than this share of a file's pairs is an
            error (raise ``max_length``, or this setting to drop them).
    """

    def __init__(
        self,
        path: str,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        val_path: str | None = None,
        val_size: int = 0,
        batch_size: int = 64,
        apply_chat_template: bool = True,
        max_length: int = 256,
        seed: int = 0,
        max_identical_fraction: float = 0.05,
    ) -> None:
        super().__init__(path, val_path, val_size, batch_size, apply_chat_template, max_length, seed)
        if not 0.0 <= max_identical_fraction <= 1.0:
            raise ValueError(f"data.max_identical_fraction must be in [0, 1], got {max_identical_fraction}")
        self.save_hyperparameters()

    def _read(self, path: str) -> list[tuple[dict, PreferenceExample]]:
        """``(record, example)`` of every pair of ``path`` but those truncation made identical (counted)."""
        hp, pairs, identical = self.hparams, [], []
        for row, record in read_rows(path):
            sides = self.sides(record, path, row)
            example = self._truncated(sides)
            if example.chosen_ids == example.rejected_ids:
                identical.append((row, first_difference(sides[0][0], sides[1][0])))
            else:
                pairs.append((record, example))
        check_identical(path, identical, len(pairs) + len(identical), hp.max_length, hp.max_identical_fraction)
        return pairs

    def encode(self, record: dict, path: str, row: int) -> PreferenceExample:
        """The pair's truncated ids and labels (see :meth:`sides`)."""
        return self._truncated(self.sides(record, path, row))

    def _truncated(self, sides: list[tuple[list[int], list[int], str]]) -> PreferenceExample:
        return PreferenceExample(*(x for ids, labels, where in sides for x in self.truncate(ids, labels, where)))

    def sides(self, record: dict, path: str, row: int) -> list[tuple[list[int], list[int], str]]:
        """``(ids, labels, where)`` of the chosen and the rejected row, checked and not yet truncated.

        Raises:
            DataError: a missing field, a value of the wrong type, an empty chosen answer or one
                equal to the rejected answer.
        """
        hp, tok = self.hparams, self.tokenizer
        for name in (hp.chosen_field, hp.rejected_field):
            if name not in record:
                raise DataError(
                    f"{Where(path, row, name)}: the field is missing; the record's fields are {sorted(record)}"
                )
        chosen_where, rejected_where = Where(path, row, hp.chosen_field), Where(path, row, hp.rejected_field)
        chosen, rejected = record[hp.chosen_field], record[hp.rejected_field]
        if hp.prompt_field in record:
            prompt, prompt_where = record[hp.prompt_field], Where(path, row, hp.prompt_field)
        else:  # implicit prompt: the turns both conversations share
            if not hp.apply_chat_template:
                raise DataError(f"{chosen_where}: implicit-prompt conversations need apply_chat_template: true")
            chosen_turns = as_messages(chosen, chosen_where)
            prompt, chosen, rejected = split_shared_prompt(
                chosen_turns, as_messages(rejected, rejected_where), chosen_where
            )
            prompt_where = chosen_where
        check_answers(chosen, rejected, chosen_where, rejected_where)
        return [
            (*completion_ids(tok, prompt, answer, prompt_where, where, hp.apply_chat_template), str(where))
            for answer, where in ((chosen, chosen_where), (rejected, rejected_where))
        ]

    def collate(self, examples: list[PreferenceExample]) -> dict[str, Tensor]:
        rows = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
        labels = [e.chosen_labels for e in examples] + [e.rejected_labels for e in examples]
        return {
            "input_ids": pad_right(rows, self.tokenizer.pad_token_id),
            "attention_mask": pad_right([[1] * len(x) for x in rows], 0),
            "labels": pad_right(labels, IGNORE_INDEX),
        }
