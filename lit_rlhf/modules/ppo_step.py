"""One PPO micro-batch: policy loss (+ entropy, + KL in the loss) and value loss; optimizer steps."""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from lit_rlhf import functional as F
from lit_rlhf.models import Actor, ValueModel
from lit_rlhf.rollout.experience import Experience
from lit_rlhf.settings import AlgorithmSettings, KLSettings

log = logging.getLogger(__name__)


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
    mask, num_actions = micro.loss_mask, micro.num_actions
    log_probs, entropy = actor.log_probs_and_entropy(
        micro.sequences, micro.attention_mask, num_actions, temperature, entropy_grad=algorithm.entropy_coef != 0
    )
    clip = (algorithm.clip_eps, algorithm.clip_eps_high)
    weights = None
    if algorithm.rollout_correction != "none":  # tis is the token level of the same weights
        cap, level = algorithm.rollout_correction_cap, algorithm.rollout_correction_level
        weights = F.behaviour_weights(micro.old_log_probs, micro.rollout_log_probs, mask, cap, level)
    loss = F.policy_loss(log_probs, micro.old_log_probs, micro.advantages, mask, *clip, algorithm.dual_clip, weights)
    mean_entropy = F.masked_mean(entropy, mask)
    stats = {
        "policy/loss": loss.detach(),
        "policy/entropy": mean_entropy.detach(),
        "policy/clip_fraction": F.clip_fraction(log_probs.detach(), micro.old_log_probs, mask, *clip),
        "policy/approx_kl": F.masked_mean(F.approx_kl(log_probs.detach(), micro.old_log_probs, "k3"), mask),
    }
    if weights is not None:
        stats["policy/behaviour_weight"] = F.masked_mean(weights, mask)
        stats["policy/behaviour_weight_max"] = torch.where(mask, weights, 0.0).max()
    if algorithm.entropy_coef:
        loss = loss - algorithm.entropy_coef * mean_entropy
    if kl.penalty == "loss" and micro.ref_log_probs is not None:  # reference-free (kl.coef 0): no KL term
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


def grad_norm(model: torch.nn.Module) -> Tensor:
    """The total gradient norm of ``model``'s parameters (a plain tensor, also for sharded gradients)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def step_optimizer(optimizer, model: torch.nn.Module, max_grad_norm: float | None, norm: Tensor) -> None:
    """Clip to ``max_grad_norm`` (if set) with the already measured ``norm``, step, and zero the gradients."""
    if max_grad_norm is not None:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class DivergenceGuard:
    """Skips an optimizer step whose loss or gradient norm is not finite; ``limit`` in a row stop the run.

    A skipped step drops the gradients and leaves the weights, optimizer state and learning-rate
    schedule as they were. Ranks agree: a non-finite value on any rank skips the step everywhere.

    Args:
        limit: consecutive non-finite steps that stop the run (``optim.max_nonfinite_steps``).
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def allows(self, values: dict[str, Tensor], step: str, last_checkpoint: str | None, all_reduce) -> bool:
        """True: take the step. False: skip it (the caller drops the gradients).

        Raises:
            FloatingPointError: the ``limit``-th non-finite step in a row, naming the metric, the step
                and the last good checkpoint.
        """
        finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in values.values()])
        bad_ranks = all_reduce((~finite).float())  # one small all-reduce per optimizer step
        if not bool((bad_ranks == 0).all()):
            self.in_a_row += 1
            self.skipped += 1
            name, value = next(
                ((k, float(v)) for (k, v), ok in zip(values.items(), finite, strict=True) if not ok),
                ("a metric on another rank", float("nan")),
            )
            if self.in_a_row >= self.limit:
                checkpoint = last_checkpoint or "none saved yet"
                raise FloatingPointError(
                    f"training diverged: {name} was {value} at {step}; {self.in_a_row} optimizer steps in a row "
                    f"had a non-finite loss or gradient norm (optim.max_nonfinite_steps={self.limit}). They were "
                    f"skipped, so the weights are the last finite ones. Last good checkpoint: {checkpoint}. "
                    "Lower the learning rates (optim.actor/critic.optimizer) or check the rewards' scale."
                )
            log.warning(
                "optimizer step at %s skipped: %s is %s (gradients dropped, weights untouched; %d/%d in a row)",
                step,
                name,
                value,
                self.in_a_row,
                self.limit,
            )
            return False
        self.in_a_row = 0
        return True


def last_checkpoint(trainer) -> str | None:
    """The newest checkpoint the run's checkpoint callbacks wrote, if any."""
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            return os.path.realpath(path)  # last.ckpt may be a link to it
    return None
