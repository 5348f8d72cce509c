"""PPO validation: sample the held-out prompts, score them, and measure the KL to the reference.

A multi-turn run validates multi-turn: each held-out prompt's whole trajectory (tool calls and
their results, or the environment's turns) is sampled with the actor's own sampler and the
validation settings, and the rewards and ``val_metrics`` read it as the rollout's rewards do.
"""

from __future__ import annotations

from typing import Any

from lit_rlhf.modules.validation import sample_validation, sample_validation_turns
from lit_rlhf.rewards import RewardBatch, score_components
from lit_rlhf.rollout.multi_turn.loop import TurnLoop, turn_inputs


def validation_turn_loop(module: Any) -> TurnLoop:
    """The module's validation turn loop (built on first use): the run's tools or environment, the
    actor's own sampler (``NativeEngine``, whatever engine the rollouts use) and the validation settings."""
    if module._val_turn_loop is None:
        from lit_rlhf.rollout.engines.native import NativeEngine

        engine = NativeEngine()
        engine.start(module.actor, module.device)
        module._val_turn_loop = TurnLoop(module.rollout.multi_turn, engine, module.tokenizer, module.val_generation)
    return module._val_turn_loop


def validation_step(module, batch: dict, batch_idx: int) -> None:
    """One batch of held-out prompts: ``val/reward``, ``val/kl`` (not in a reference-free run) and
    each of ``val_metrics`` on responses sampled with the validation settings (seeded per batch)."""
    prompts, columns = batch["prompts"], batch["columns"]
    inputs: tuple = ()
    if module.rollout.multi_turn is None:
        gen, kl = sample_validation(
            module.policy, batch["input_ids"], batch["attention_mask"], module.val_generation, batch_idx
        )
        texts = lambda: module.decode_responses(gen)  # noqa: E731
    else:
        gen, trajectories, kl = sample_validation_turns(
            module.policy, validation_turn_loop(module), batch, module.val_generation, batch_idx
        )
        inputs = turn_inputs(trajectories, gen.sequences.device)
        texts = inputs[0]
    module.val_reward.update(module.score_responses(gen, prompts, columns, *inputs).scores)
    module.log("val/reward", module.val_reward, on_epoch=True, prog_bar=True)
    if kl is not None:  # none in a reference-free run
        module.val_kl.update(kl)
        module.log("val/kl", module.val_kl, on_epoch=True)
    if module.val_metric_fns:
        completions = inputs[1] if inputs else None
        responses = RewardBatch(prompts, texts, columns, completions=completions)
        for name, values in score_components(module.val_metric_fns, responses, module.device).items():
            module.val_metric_means[name].update(values)
            module.log(f"val/{name}", module.val_metric_means[name], on_epoch=True, prog_bar=True)
