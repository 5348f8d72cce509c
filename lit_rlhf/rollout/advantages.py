"""From scores and per-token log-probs/values to rewards, advantages and returns (rollout step 4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lit_rlhf import functional as F

AdvantageEstimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
CRITIC_FREE: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp")

AllReduce = Callable[[Tensor], Tensor]


def no_reduce(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class AdvantageSettings:
    """How advantages are estimated. See ``PPOModule`` for each field's meaning."""

    estimator: AdvantageEstimator = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: F.KLEstimator = "k1"
    kl_in_reward: bool = True
    whiten: bool = True
    group_size: int = 1


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
    ref_log_probs: Tensor,
    values: Tensor,
    action_mask: Tensor,
    kl_coef: float,
    settings: AdvantageSettings,
    all_reduce: AllReduce = no_reduce,
) -> Advantages:
    """Per-token KL, rewards, advantages and returns for one rollout (all ``[B, A]``).

    ``gae``: score at the last token, ``-kl_coef * kl`` elsewhere (when the KL is in the reward),
    GAE with the critic's values. ``grpo``/``dr_grpo``/``rloo``: the group-baselined score takes
    the score's place and the critic is absent (values are 0). ``reinforce_pp``: discounted returns
    of the raw token rewards. Returns are the discounted sums the critic-free estimators use as
    advantages.
    """
    kl = F.approx_kl(old_log_probs, ref_log_probs, settings.kl_estimator)
    kl = torch.where(action_mask.bool(), kl, 0.0)
    if settings.estimator in ("grpo", "dr_grpo", "rloo"):
        scores = F.group_advantages(scores, settings.group_size, settings.estimator)
    rewards = F.token_rewards(scores, kl, action_mask, kl_coef if settings.kl_in_reward else 0.0)
    if settings.estimator == "gae":
        advantages, returns = F.gae(rewards, values, action_mask, settings.gamma, settings.lam)
    else:
        advantages, returns = F.gae(rewards, torch.zeros_like(rewards), action_mask, settings.gamma, 1.0)
    if settings.whiten:
        advantages = global_whiten(advantages, action_mask, all_reduce)
    advantages = torch.where(action_mask.bool(), advantages, 0.0)
    return Advantages(kl, rewards, advantages, returns)
