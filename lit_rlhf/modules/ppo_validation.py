"""PPO validation: sample the held-out prompts, score them, and measure the KL to the reference."""

from __future__ import annotations

from lit_rlhf.modules.validation import sample_validation
from lit_rlhf.rewards import RewardBatch, score_components


def validation_step(module, batch: dict, batch_idx: int) -> None:
    """One batch of held-out prompts: ``val/reward``, ``val/kl`` (not in a reference-free run) and
    each of ``val_metrics`` on responses sampled with the validation settings (seeded per batch)."""
    gen, kl = sample_validation(
        module.policy, batch["input_ids"], batch["attention_mask"], module.val_generation, batch_idx
    )
    prompts, columns = batch["prompts"], batch["columns"]
    module.val_reward.update(module.score_responses(gen, prompts, columns).scores)
    module.log("val/reward", module.val_reward, on_epoch=True, prog_bar=True)
    if kl is not None:  # none in a reference-free run
        module.val_kl.update(kl)
        module.log("val/kl", module.val_kl, on_epoch=True)
    if module.val_metric_fns:
        responses = RewardBatch(prompts, lambda: module.decode_responses(gen), columns)
        for name, values in score_components(module.val_metric_fns, responses, module.device).items():
            module.val_metric_means[name].update(values)
            module.log(f"val/{name}", module.val_metric_means[name], on_epoch=True, prog_bar=True)
