"""Critic and reward model: a transformer backbone with a scalar head."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from lit_rlhf.functional import last_valid_index
from lit_rlhf.models.decoding import runs_shared_prefix
from lit_rlhf.models.loading import (
    check_model_path,
    disable_dropout,
    load_error,
    load_pretrained,
    position_ids_from_mask,
    prepare,
)
from lit_rlhf.models.padding import (
    after_cache,
    pack_rows,
    packed_forward,
    shared_prefix_cache,
    split_shared_prefix,
    unpack,
    valid_window,
)
from lit_rlhf.settings import LoadSettings

HEAD_NAMES = ("score", "classifier")


class ValueModel(nn.Module):
    """Per-token values (critic) and sequence scores (reward model) from one scalar head.

    The value of action ``t`` is the head's output at the token *before* it (the state that chose
    it); a sequence's score is the head's output at its last valid token.

    Args:
        model: a ``*ForSequenceClassification`` model with ``num_labels=1`` (or a peft model
            wrapping one). Its own pooling is bypassed; the backbone and head are called directly.
        padding_free: pack the rows of every forward into one row without padding (worth it with
            ``flash_attention_2``; see ``lit_rlhf.models.padding``).
    """

    def __init__(self, model: nn.Module, padding_free: bool = False) -> None:
        super().__init__()
        self.model = model
        self.padding_free = padding_free
        config = self._inner.config
        mean, std = getattr(config, "reward_mean", 0.0), getattr(config, "reward_std", 1.0)
        self.register_buffer("reward_mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("reward_std", torch.tensor(float(std)), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        settings: LoadSettings = LoadSettings(),
        role: str = "value model",
        new_head_ok: bool = False,
        frozen: bool = False,
        fix: str = "",
    ) -> ValueModel:
        """Load a sequence-classification checkpoint (its scalar head is reused).

        A checkpoint without the head (a causal LM) is an error naming ``role``, unless
        ``new_head_ok`` (then the head starts at random); ``fix`` says what to set instead. ``frozen``
        models load from safetensors only.
        """
        head = _head_name(path, settings)
        model = load_pretrained(
            AutoModelForSequenceClassification, path, settings, role, head, new_head_ok, frozen, fix, num_labels=1
        )
        head_name = next(name for name in HEAD_NAMES if hasattr(model, name))
        model = prepare(model, settings, task_type="SEQ_CLS", modules_to_save=[head_name])
        disable_dropout(model)
        return cls(model, padding_free=settings.padding_free)

    @property
    def _inner(self) -> nn.Module:
        """The ``*ForSequenceClassification`` module (unwrapping peft)."""
        model = self.model
        if hasattr(model, "disable_adapter"):
            model = model.base_model.model
        return model

    def _hidden(self, sequences: Tensor, attention_mask: Tensor, columns: Tensor) -> Tensor:
        """Backbone outputs ``[B, k, H]`` at ``columns [B, k]`` of each row.

        Padding is skipped as in ``Actor.action_logits``: all-padding columns are trimmed, and with
        ``padding_free`` the rows are packed into one. Outputs at padding tokens are zeros then.
        """
        inner = self._inner
        backbone = getattr(inner, inner.base_model_prefix)
        split = None
        if runs_shared_prefix(self.model):  # the prefix ends before the first column read (see shared_prefix)
            first_read = int(torch.where(columns >= 0, columns, sequences.shape[1]).min())
            split = split_shared_prefix(sequences, attention_mask, sequences.shape[1] - first_read, self.padding_free)
        if self.padding_free and split is None:
            packed = pack_rows(sequences, attention_mask)
            hidden = packed_forward(backbone, packed, attention_mask.sum(-1), use_cache=False).last_hidden_state[0]
            wanted = torch.where(columns >= 0, packed.index.gather(1, columns.clamp_min(0)), -1)
            return unpack(hidden[wanted[wanted >= 0]], wanted)
        past, offset = None, 0
        if split is not None:
            past, offset = shared_prefix_cache(backbone, split, sequences), split.length
            sequences, attention_mask, columns = split.sequences, split.attention_mask, columns - split.length
        start, end = valid_window(attention_mask)
        mask = attention_mask[:, start:end]
        hidden = backbone(
            input_ids=sequences[:, start:end],
            attention_mask=after_cache(mask, offset),
            position_ids=offset + position_ids_from_mask(mask),
            past_key_values=past,
            use_cache=past is not None,
        ).last_hidden_state
        inside = (columns >= start) & (columns < end)
        index = (columns - start).clamp(0, end - start - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = hidden.gather(1, index)
        return torch.where(inside.unsqueeze(-1), picked, 0.0)

    def _token_scores(self, sequences: Tensor, attention_mask: Tensor, columns: Tensor) -> Tensor:
        hidden = self._hidden(sequences, attention_mask, columns)
        return _head(self._inner)(hidden).squeeze(-1).float()

    def forward(self, sequences: Tensor, attention_mask: Tensor, num_actions: int) -> Tensor:
        """Values ``[B, A]`` (fp32) of the last ``num_actions`` tokens, read at the token before each.

        Values at positions that predict padding are not meaningful (zeros after trimming).
        """
        total = sequences.shape[1]
        columns = torch.arange(total - num_actions - 1, total - 1, device=sequences.device)
        return self._token_scores(sequences, attention_mask, columns.expand(sequences.shape[0], -1))

    def score(self, sequences: Tensor, attention_mask: Tensor, normalize: bool = False) -> Tensor:
        """Scores ``[B]`` at each row's last valid token (``attention_mask`` right-padded after it).

        With ``normalize=True`` the stored reward mean/std are applied: ``(s - mean) / std``.
        """
        scores = self._token_scores(sequences, attention_mask, last_valid_index(attention_mask).unsqueeze(1))[:, 0]
        if normalize:
            scores = (scores - self.reward_mean) / self.reward_std
        return scores

    def set_normalization(self, mean: float, std: float) -> None:
        """Store reward statistics (saved into the checkpoint's config) for ``score(normalize=True)``."""
        if std <= 0:
            raise ValueError(f"reward std must be > 0, got {std}")
        self.reward_mean.fill_(mean)
        self.reward_std.fill_(std)

    def save_pretrained(
        self, path: str, merge_lora: bool = True, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        """Write a Hugging Face ``*ForSequenceClassification`` checkpoint with the reward statistics."""
        model = self.model
        if hasattr(model, "disable_adapter") and merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        config = model.config
        config.reward_mean, config.reward_std = self.reward_mean.item(), self.reward_std.item()
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def _head_name(path: str, settings: LoadSettings) -> str:
    """The name of the scalar head that ``AutoModelForSequenceClassification`` builds for ``path``."""
    from transformers import AutoConfig

    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(path, err) from err
    return "classifier" if config.model_type in ("bert", "roberta", "deberta", "deberta-v2") else "score"


def has_scalar_head(path: str, settings: LoadSettings) -> bool | None:
    """Whether the checkpoint at ``path`` is a sequence classifier (so it has a scalar head), read from
    its ``config.json`` alone (no weights load); None when its config names no architecture."""
    from transformers import AutoConfig

    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(path, err) from err
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return None
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def _head(model: nn.Module) -> nn.Module:
    for name in HEAD_NAMES:
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no scalar head named one of {HEAD_NAMES}")
