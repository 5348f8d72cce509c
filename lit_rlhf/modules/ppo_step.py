"""One PPO micro-batch: policy loss (+ entropy, + KL in the loss) and value loss; optimizer steps."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf import functional as F
from lit_rlhf.models import Actor, ValueModel
from lit_rlhf.rollout.experience import Experience
from lit_rlhf.settings import AlgorithmSettings, KLSettings


def ppo_micro_step(
    actor: Actor,
    critic: ValueModel | None,
    micro: Experience,
    algorithm: AlgorithmSettings,
    kl: KLSettings,
    kl_coef: float,
    temperature: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch (token mean over its valid tokens) and detached diagnostics.

    Actor and critic share no parameters, so their losses are summed into one backward pass.
    """
    mask, num_actions = micro.action_mask, micro.num_actions
    log_probs, entropy = actor.log_probs_and_entropy(
        micro.sequences, micro.attention_mask, num_actions, temperature, entropy_grad=algorithm.entropy_coef != 0
    )
    clip = (algorithm.clip_eps, algorithm.clip_eps_high)
    loss = F.policy_loss(log_probs, micro.old_log_probs, micro.advantages, mask, *clip, algorithm.dual_clip)
    mean_entropy = F.masked_mean(entropy, mask)
    stats = {
        "policy/loss": loss.detach(),
        "policy/entropy": mean_entropy.detach(),
        "policy/clip_fraction": F.clip_fraction(log_probs.detach(), micro.old_log_probs, mask, *clip),
        "policy/approx_kl": F.masked_mean(F.approx_kl(log_probs.detach(), micro.old_log_probs, "k3"), mask),
    }
    if algorithm.entropy_coef:
        loss = loss - algorithm.entropy_coef * mean_entropy
    if kl.penalty == "loss":
        kl_loss = F.masked_mean(F.approx_kl(log_probs, micro.ref_log_probs, kl.estimator), mask)
        stats["policy/kl_loss"] = kl_loss.detach()
        loss = loss + kl_coef * kl_loss
    if critic is not None:
        values = critic(micro.sequences, micro.attention_mask, num_actions)
        value_loss = F.value_loss(values, micro.values, micro.returns, mask, algorithm.value_clip_eps)
        stats["critic/loss"] = value_loss.detach()
        stats["critic/explained_variance"] = F.explained_variance(values.detach(), micro.returns, mask)
        stats["critic/value_mean"] = F.masked_mean(values.detach(), mask)
        loss = loss + value_loss
    return loss, stats


def step_optimizer(optimizer, model: torch.nn.Module, max_grad_norm: float | None) -> Tensor:
    """Clip (if set), step and zero one optimizer; returns the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()
