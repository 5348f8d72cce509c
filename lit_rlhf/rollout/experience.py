"""Experience (one rollout's tensors) and ExperienceBuffer (the rollout's training set)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from lit_rlhf.models.padding import length_groups
from lit_rlhf.seeds import buffer_order_seed


@dataclass
class Experience:
    """Everything PPO needs about a batch of sampled responses. ``B`` rows, ``P+A`` tokens.

    Attributes:
        sequences: ``[B, P+A]`` long. Left-padded prompt, then the right-padded response.
        attention_mask: ``[B, P+A]`` long. 1 for prompt tokens and every response token (what is attended to).
        loss_mask: ``[B, A]`` bool. True exactly on the response tokens the policy sampled in this
            rollout (the tokens trained on; a single-turn response's tokens up to its EOS or stop
            token). It may have holes: a multi-turn response attends to tool output it did not sample.
        old_log_probs: ``[B, A]`` fp32. Actor log-probs at sampling time (the PPO ratio's denominator).
        rollout_log_probs: ``[B, A]`` fp32. The sampler's own log-probs of the tokens (an engine's may
            differ slightly from the trainer's ``old_log_probs``; equal to them when they are reused).
        ref_log_probs: ``[B, A]`` fp32. Reference-policy log-probs of the same tokens (None in a
            reference-free run, ``kl.coef: 0``: no reference is built or run).
        values: ``[B, A]`` fp32. Critic value of the state before each action (zeros without a critic).
        rewards: ``[B, A]`` fp32. Per-token rewards: KL penalty, plus the score at the last trainable token.
        advantages: ``[B, A]`` fp32. After whitening, where whitening applies.
        returns: ``[B, A]`` fp32. Targets of the value loss.
        scores: ``[B]`` fp32. Sequence reward after normalisation, clipping and the missing-EOS penalty.
        kl: ``[B, A]`` fp32. Per-token KL estimate to the reference (the configured estimator).
        rollout_id: ``[B]`` long. Which rollout (epoch) produced each row.
        versions: ``[B, A]`` long. The policy version that sampled each response token: the rollout
            whose weights sampled it (``rollout_id`` everywhere in a synchronous run; older for the
            tokens an asynchronous rollout carried over). Meaningful where ``loss_mask`` is set.
    """

    sequences: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    old_log_probs: Tensor
    rollout_log_probs: Tensor
    ref_log_probs: Tensor | None
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor
    kl: Tensor
    rollout_id: Tensor
    versions: Tensor | None = None

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_actions(self) -> int:
        return self.loss_mask.shape[1]

    def index(self, rows: Tensor | slice) -> Experience:
        """The rows ``rows`` of every field."""
        return self._map(lambda t: t[rows])

    def split(self, size: int) -> list[Experience]:
        """Consecutive chunks of at most ``size`` rows."""
        return [self.index(slice(start, start + size)) for start in range(0, len(self), size)]

    def micro_batches(self, max_rows: int, max_tokens: int | None = None, count: int | None = None) -> list[Experience]:
        """Micro-batches of rows of similar length (see ``lit_rlhf.models.padding.length_groups``)."""
        groups = length_groups(self.attention_mask.sum(-1), max_rows, max_tokens, count)
        return [self.index(rows) for rows in groups]

    def to(self, device: torch.device | str) -> Experience:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Experience:
        """``fn`` applied to every field that holds a tensor (absent ones, None, stay None)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: None if v is None else fn(v) for k, v in fields.items()})


class ExperienceBuffer(IterableDataset):
    """The rollout's training set: ``size`` experiences, walked ``ppo_epochs`` times in shuffled mini-batches.

    The train dataloader yields *index* mini-batches, which ``training_step`` resolves against the
    buffer's current contents with :meth:`get`. Lightning builds the train iterator and fetches its
    first batch before ``on_train_epoch_start``, when the rollout callback refills the buffer;
    because the indices carry no data, every mini-batch of an epoch still comes from that epoch's
    rollout. The order is seeded by ``(seed, epoch)``, so a resumed run draws the same mini-batches.

    Args:
        size: experiences per rollout on this rank (prompts per rollout x samples per prompt).
        mini_batch_size: experiences per optimizer step.
        ppo_epochs: passes over the buffer per rollout.
        seed: the run's seed.
    """

    def __init__(self, size: int, mini_batch_size: int, ppo_epochs: int = 1, seed: int = 0) -> None:
        if size % mini_batch_size:
            raise ValueError(f"buffer size {size} is not a multiple of mini_batch_size={mini_batch_size}")
        self.size, self.mini_batch_size, self.ppo_epochs, self.seed = size, mini_batch_size, ppo_epochs, seed
        self.rollout_source: Callable[[], int] = lambda: 0
        self.experience: Experience | None = None

    def __len__(self) -> int:
        return self.ppo_epochs * self.size // self.mini_batch_size

    def set_rollout(self, rollout: int | Callable[[], int]) -> None:
        """The rollout whose order ``__iter__`` draws: a number, or a callable read at each ``__iter__``."""
        self.rollout_source = rollout if callable(rollout) else (lambda: rollout)

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(buffer_order_seed(self.seed, self.rollout_source()))
        for _ in range(self.ppo_epochs):
            yield from torch.randperm(self.size, generator=generator).split(self.mini_batch_size)

    def fill(self, experience: Experience) -> None:
        if len(experience) != self.size:
            raise ValueError(f"rollout produced {len(experience)} experiences, the buffer holds {self.size}")
        self.experience = experience

    def get(self, indices: Tensor) -> Experience:
        """The experiences at ``indices`` (a mini-batch from the dataloader)."""
        if self.experience is None:
            raise RuntimeError("the experience buffer is empty: the rollout callback has not run this epoch")
        return self.experience.index(indices.to(self.experience.sequences.device))
