"""From scores and per-token log-probs/values to rewards, advantages and returns (rollout step 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lit_rlhf import functional as F
from lit_rlhf.settings import GROUP_ESTIMATORS, AlgorithmSettings, KLSettings

AllReduce = Callable[[Tensor], Tensor]


def no_reduce(x: Tensor) -> Tensor:
    return x


class Advantages(NamedTuple):
    kl: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor


def global_whiten(values: Tensor, mask: Tensor, all_reduce: AllReduce = no_reduce, shift_mean: bool = True) -> Tensor:
    """``masked_whiten`` with mean and (Bessel-corrected) variance over the valid tokens of all ranks.

    ``all_reduce`` sums a tensor across ranks (identity in a single process), so two ranks with
    half the rows each whiten exactly like one process with all of them.
    """
    mask = mask.bool()
    x = torch.where(mask, values.float(), 0.0)
    stats = all_reduce(torch.stack([x.sum(), x.square().sum(), mask.sum().float()]))
    total, total_sq, count = stats.unbind()
    mean = total / count.clamp_min(1)
    var = (total_sq - count * mean.square()).clamp_min(0) / (count - 1).clamp_min(1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def compute_advantages(
    scores: Tensor,
    old_log_probs: Tensor,
    ref_log_probs: Tensor | None,
    values: Tensor,
    loss_mask: Tensor,
    kl_coef: float,
    algorithm: AlgorithmSettings,
    kl: KLSettings,
    group_size: int,
    all_reduce: AllReduce = no_reduce,
    token_bonus: Tensor | None = None,
) -> Advantages:
    """Per-token KL, rewards, advantages and returns for one rollout (all ``[B, A]``).

    ``gae``: score at the last token, ``-kl_coef * kl`` elsewhere (when the KL is in the reward),
    GAE with the critic's values. ``grpo``/``dr_grpo``/``rloo``: the group-baselined score takes
    the score's place and the critic is absent (values are 0). ``reinforce_pp``: discounted returns
    of the raw token rewards. Returns are the discounted sums the critic-free estimators use as
    advantages. ``group_size`` is the number of samples per prompt (contiguous rows). Without a
    reference (``ref_log_probs`` None, a reference-free run) the KL is zero. ``token_bonus`` ``[B, A]``
    is added to the token rewards (a multi-turn rollout's turn rewards at each turn's last token).
    """
    if ref_log_probs is None:
        token_kl = torch.zeros_like(old_log_probs, dtype=torch.float32)
    else:
        token_kl = torch.where(loss_mask.bool(), F.approx_kl(old_log_probs, ref_log_probs, kl.estimator), 0.0)
    estimator = algorithm.advantage_estimator
    if estimator in GROUP_ESTIMATORS:
        scores = F.group_advantages(scores, group_size, estimator)
    rewards = F.token_rewards(scores, token_kl, loss_mask, kl_coef if kl.penalty == "reward" else 0.0)
    if token_bonus is not None:
        rewards = rewards + torch.where(loss_mask.bool(), token_bonus.float(), 0.0)
    if estimator == "gae":
        advantages, returns = F.gae(rewards, values, loss_mask, algorithm.gamma, algorithm.lam)
    else:
        advantages, returns = F.gae(rewards, torch.zeros_like(rewards), loss_mask, algorithm.gamma, 1.0)
    if algorithm.whiten:
        advantages = global_whiten(advantages, loss_mask, all_reduce)
    advantages = torch.where(loss_mask.bool(), advantages, 0.0)
    return Advantages(token_kl, rewards, advantages, returns)
