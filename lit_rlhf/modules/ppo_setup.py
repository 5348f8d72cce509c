"""PPOModule's set-up: the checks that span settings groups, and loading the policy-side models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lit_rlhf.models import Actor, ValueModel
from lit_rlhf.rewards import RewardComponent, RewardModel
from lit_rlhf.rewards.model import freeze
from lit_rlhf.settings import (
    GROUP_ESTIMATORS,
    AlgorithmSettings,
    GenerationSettings,
    PPOModelSettings,
    RolloutSettings,
)


def check_ppo_settings(
    generation: GenerationSettings,
    rollout: RolloutSettings,
    algorithm: AlgorithmSettings,
    rewards: Sequence[RewardComponent],
    custom_reward: bool,
) -> None:
    """Raise ``ValueError`` naming the settings of an invalid combination across groups.

    Each group has already checked its own fields; this runs once, before any model is loaded.
    """
    n = generation.n_samples_per_prompt
    experiences = rollout.rollout_batch_size * n
    if experiences % algorithm.mini_batch_size:
        raise ValueError(
            f"rollout.rollout_batch_size * generation.n_samples_per_prompt ({experiences} experiences per rollout) "
            f"must be a multiple of algorithm.mini_batch_size ({algorithm.mini_batch_size})"
        )
    estimator = algorithm.advantage_estimator
    if estimator in GROUP_ESTIMATORS and n < 2:
        raise ValueError(
            f"algorithm.advantage_estimator={estimator!r} compares the samples of a prompt; "
            f"it needs generation.n_samples_per_prompt >= 2, got {n}"
        )
    if generation.temperature == 0:
        raise ValueError(
            "generation.temperature=0 samples greedily: every sample of a prompt is the same and PPO has nothing "
            "to compare; training rollouts need temperature > 0 (use generation.val_temperature: 0 for greedy "
            "validation)"
        )
    if not rewards and not custom_reward:
        raise ValueError(
            "no reward: add a component to rewards (RewardModel, RewardFunction, RemoteReward), "
            "or override compute_reward in a subclass"
        )
    names = [component.name for component in rewards]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two reward components are named {duplicates}; give them distinct names (name: ...)")


@dataclass
class PolicyModels:
    actor: Actor
    critic: ValueModel | None
    reference: Actor | None


def critic_path(models: PPOModelSettings, rewards: Sequence[RewardComponent]) -> str:
    """Where the critic starts: ``critic_path``, else the first reward model's path, else the actor's."""
    if models.critic_path is not None:
        return models.critic_path
    reward_models = [component.path for component in rewards if isinstance(component, RewardModel)]
    return reward_models[0] if reward_models else models.actor_path


def build_models(
    models: PPOModelSettings, tokenizer: PreTrainedTokenizerBase, uses_critic: bool, critic_source: str
) -> PolicyModels:
    """Load the actor, the critic (from ``critic_source``) and the frozen reference."""
    actor = Actor.from_pretrained(models.actor_path, tokenizer, models)
    reference = None
    if models.reference_path is not None or not models.lora.enabled:
        reference = freeze(
            Actor.from_pretrained(models.reference_path or models.actor_path, tokenizer, models.frozen())
        )
    critic = ValueModel.from_pretrained(critic_source, models) if uses_critic else None
    return PolicyModels(actor, critic, reference)
