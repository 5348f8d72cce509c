"""PPO validation: sample the held-out prompts, score them, and measure the KL to the reference."""

from __future__ import annotations

import torch

from lit_rlhf.rewards import RewardBatch, score_components
from lit_rlhf.rollout.runner import reference_log_probs
from lit_rlhf.seeds import validation_seed


def validation_step(module, batch: dict, batch_idx: int) -> None:
    """One batch of held-out prompts: ``val/reward``, ``val/kl`` (not in a reference-free run) and
    each of ``val_metrics`` on responses sampled with the validation settings (seeded per batch)."""
    generator = torch.Generator(module.device).manual_seed(validation_seed(batch_idx))
    gen = module.actor.generate(batch["input_ids"], batch["attention_mask"], module.val_generation, generator)
    prompts, columns = batch["prompts"], batch["columns"]
    module.val_reward.update(module.score_responses(gen, prompts, columns).scores)
    module.log("val/reward", module.val_reward, on_epoch=True, prog_bar=True)
    if module.kl.uses_reference:
        ref_log_probs = reference_log_probs(
            module.actor,
            module.reference,
            gen.sequences,
            gen.attention_mask,
            gen.loss_mask.shape[1],
            module.val_generation.scoring_temperature,
        )  # the policy's own log-probs come from the sampler: no second actor forward
        module.val_kl.update(torch.where(gen.loss_mask, gen.log_probs - ref_log_probs, 0.0).sum(-1))
        module.log("val/kl", module.val_kl, on_epoch=True)
    if module.val_metric_fns:
        responses = RewardBatch(prompts, lambda: module.decode_responses(gen), columns)
        for name, values in score_components(module.val_metric_fns, responses, module.device).items():
            module.val_metric_means[name].update(values)
            module.log(f"val/{name}", module.val_metric_means[name], on_epoch=True, prog_bar=True)
