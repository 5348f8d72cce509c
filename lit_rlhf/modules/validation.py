"""Sampled validation, one function for PPO and DPO: a response per held-out prompt and its KL."""

from __future__ import annotations

from typing import Any

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
    return gen, kl_to_reference(policy, gen, generation)


def kl_to_reference(policy: PolicySet, gen: GenerationOutput, generation: GenerationSettings) -> Tensor | None:
    """Each response's ``sum log pi - log pi_ref`` over its sampled tokens ``[B]``, the policy's log-probs
    the sampler's (None without a reference term)."""
    if not policy.has_reference:
        return None
    ref = policy.reference_log_probs(gen.sequences, gen.attention_mask, gen.num_actions, generation.scoring_temperature)
    return torch.where(gen.loss_mask, gen.log_probs - ref, 0.0).sum(-1)


@torch.no_grad()
def sample_validation_turns(
    policy: PolicySet, turn_loop: Any, batch: dict, generation: GenerationSettings, batch_idx: int
) -> tuple[GenerationOutput, list, Tensor | None]:
    """Each held-out prompt's multi-turn trajectory (``turn_loop``: the run's tools or environment
    with the actor's own sampler and the validation settings), row ``i`` seeded
    ``validation_seed(batch_idx) + i``; the packed trajectories, the turn loop's results and each
    response's KL to the reference over its sampled tokens (None without a reference term)."""
    from lit_rlhf.rollout.engines.packing import left_padded, pack_samples
    from lit_rlhf.rollout.multi_turn.loop import conversations

    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    first = validation_seed(batch_idx)
    seeds = [first + i for i in range(len(input_ids))]
    trajectories = turn_loop.run(*conversations(input_ids, attention_mask, batch["prompts"], batch["columns"]), seeds)
    prompt_ids = [t.trajectory.prompt_ids for t in trajectories]
    prompts, prompt_mask = left_padded(prompt_ids, policy.actor.pad_token_id, input_ids.device)
    gen = pack_samples(prompts, prompt_mask, [t.sample for t in trajectories], policy.actor.pad_token_id)
    return gen, trajectories, kl_to_reference(policy, gen, generation)
