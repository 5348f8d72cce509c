"""Sampled validation, one function for PPO and DPO: a response per held-out prompt and its KL."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.models import GenerationOutput
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.seeds import validation_seed
from lit_rlhf.settings import GenerationSettings


@torch.no_grad()
def sample_validation(
    policy: PolicySet, input_ids: Tensor, attention_mask: Tensor, generation: GenerationSettings, batch_idx: int
) -> tuple[GenerationOutput, Tensor | None]:
    """One response per left-padded prompt with the validation settings, seeded per batch (every
    validation of a policy samples the same way), and each response's KL to the reference
    (``sum log pi - log pi_ref`` over its sampled tokens, ``[B]``; None without a reference term).

    The policy's own log-probs are the sampler's: only the reference runs a forward.
    """
    generator = torch.Generator(input_ids.device).manual_seed(validation_seed(batch_idx))
    gen = policy.actor.generate(input_ids, attention_mask, generation, generator)
    if not policy.has_reference:
        return gen, None
    ref = policy.reference_log_probs(gen.sequences, gen.attention_mask, gen.num_actions, generation.scoring_temperature)
    return gen, torch.where(gen.loss_mask, gen.log_probs - ref, 0.0).sum(-1)
