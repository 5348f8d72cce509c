"""RewardModel: a frozen scalar-head model (``*ForSequenceClassification``) as a reward component."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf import functional as F
from lit_rlhf.models import ValueModel, load_tokenizer
from lit_rlhf.models.padding import length_groups
from lit_rlhf.models.policy_set import freeze
from lit_rlhf.rewards.base import RewardBatch, RewardComponent
from lit_rlhf.settings import LoadSettings


def append_eos(sequences: Tensor, attention_mask: Tensor, eos_token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Rows whose last valid token is not an EOS get one appended (one extra column for all rows).

    Rows are left-padded prompts followed by right-padded responses, so a row's last valid token
    is at its last 1 in ``attention_mask``.
    """
    last = F.last_valid_index(attention_mask)
    ended = torch.isin(sequences.gather(1, last.unsqueeze(1)).squeeze(1), eos_token_ids)
    pad_column = sequences.new_zeros(sequences.shape[0], 1)
    sequences, attention_mask = torch.cat([sequences, pad_column], 1), torch.cat([attention_mask, pad_column], 1)
    rows = (~ended).nonzero().squeeze(1)
    sequences[rows, last[rows] + 1] = eos_token_ids[0]
    attention_mask[rows, last[rows] + 1] = 1
    return sequences, attention_mask


def check_stored_statistics(path: str, load: LoadSettings) -> None:
    """``normalize=True`` needs the reward mean/std that ``RewardModelModule`` stores in the config.

    Raises:
        ValueError: naming the checkpoint and both fixes.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=load.trust_remote_code)
    if getattr(config, "reward_mean", None) is None or getattr(config, "reward_std", None) is None:
        raise ValueError(
            f"RewardModel(normalize=true): {path!r} stores no reward mean/std (reward_mean, reward_std in its "
            "config.json), so there is nothing to normalise with; train the reward model with lit_rlhf's "
            "RewardModelModule (e.g. `lit-rlhf fit --config configs/rm_tiny.yaml`), which stores them, or set "
            "normalize: false"
        )


class RewardModel(RewardComponent):
    """A frozen reward model's score of ``prompt + response + EOS``.

    Every response is scored as a finished one: an EOS is appended where the response has none
    (a response cut at ``max_new_tokens`` is penalised by ``algorithm.missing_eos_penalty``
    instead). When the reward model's tokenizer has the actor's vocabulary, the actor's token ids
    go straight in; otherwise the text is re-tokenised with the reward model's own tokenizer. Both
    give the same score.

    Args:
        path: a ``*ForSequenceClassification`` checkpoint (local directory or hub id).
        weight: the component's weight in the summed reward.
        normalize: apply the mean/std stored in the checkpoint: ``(s - mean) / std`` (a checkpoint
            without them, one not trained by ``RewardModelModule``, is an error).
        micro_batch_size: rows per reward-model forward (rows of similar length go together).
        micro_batch_tokens: also cut a micro-batch before its rows x its longest row pass this many
            tokens (None = rows only).
        name: the name in metrics and errors (default ``reward_model``).
        timeout_s: seconds one batch's forwards may take; checked when they return (a forward
            cannot be stopped part-way), the run then stops with an error naming the model.
    """

    # the forward needs the trainer thread's autocast and device state (both thread-local)
    score_on_thread = False

    def __init__(
        self,
        path: str,
        weight: float = 1.0,
        normalize: bool = False,
        micro_batch_size: int = 16,
        micro_batch_tokens: int | None = None,
        name: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(weight, name, timeout_s)
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"RewardModel.path must be a model directory or hub id, got {path!r}")
        if micro_batch_size < 1 or (micro_batch_tokens is not None and micro_batch_tokens < 1):
            raise ValueError(
                f"RewardModel.micro_batch_size and micro_batch_tokens must be >= 1, got {micro_batch_size}, "
                f"{micro_batch_tokens}"
            )
        self.path, self.normalize, self.micro_batch_size = path, normalize, micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.model: ValueModel | None = None
        self.tokenizer = None
        self.shares_tokenizer = False

    def default_name(self) -> str:
        return "reward_model"

    def setup(self, tokenizer, load: LoadSettings) -> None:
        fix = (
            ": a reward model is a *ForSequenceClassification checkpoint with a trained score head (RewardModelModule)"
        )
        role = f"reward model {self.name}"
        if self.normalize:
            check_stored_statistics(self.path, load)
        self.model = freeze(ValueModel.from_pretrained(self.path, load.frozen(), role, frozen=True, fix=fix))
        self.tokenizer = load_tokenizer(self.path, padding_side="right")
        self.shares_tokenizer = tokenizer is not None and self.tokenizer.get_vocab() == tokenizer.get_vocab()
        eos = self.tokenizer.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos_ids:
            raise ValueError(f"reward model {self.path!r}: its tokenizer has no EOS token to end responses with")
        self.register_buffer("eos_token_ids", torch.tensor(eos_ids), persistent=False)

    @torch.no_grad()
    def score(self, batch: RewardBatch) -> Tensor:
        if self.shares_tokenizer and batch.sequences is not None:
            sequences, mask = append_eos(batch.sequences, batch.attention_mask, self.eos_token_ids.to(batch.sequences))
        else:
            sequences, mask = self.tokenize(batch.prompts, batch.responses)
        groups = length_groups(mask.sum(-1), self.micro_batch_size, self.micro_batch_tokens)  # little padding
        scores = torch.cat([self.model.score(sequences[rows], mask[rows], normalize=self.normalize) for rows in groups])
        return scores[torch.argsort(torch.cat(groups))]

    def tokenize(self, prompts: list[str], responses: list[str]) -> tuple[Tensor, Tensor]:
        """``prompt + response + EOS`` with the reward model's tokenizer, right-padded."""
        tok = self.tokenizer
        texts = [p + r + tok.eos_token for p, r in zip(prompts, responses, strict=True)]
        device = self.eos_token_ids.device
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        return enc.input_ids, enc.attention_mask

    def init_args(self) -> dict:
        return {
            "path": self.path,
            "normalize": self.normalize,
            "micro_batch_size": self.micro_batch_size,
            "micro_batch_tokens": self.micro_batch_tokens,
            **super().init_args(),
        }
