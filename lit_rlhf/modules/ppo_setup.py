"""PPOModule's set-up: the checks that span settings groups, and loading the policy-side models."""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from lit_rlhf.models.policy_set import CriticSpec, PolicySet
from lit_rlhf.models.value import has_scalar_head
from lit_rlhf.rewards import RewardComponent, RewardModel
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
    models: PPOModelSettings | None = None,
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
    correction = algorithm.rollout_correction
    if correction != "none" and not rollout.recomputes_old_log_probs:
        raise ValueError(
            f"algorithm.rollout_correction={correction!r} compares the trainer's old log-probs with the "
            "sampler's; set rollout.recompute_old_log_probs: true (the default with an engine)"
        )
    if rollout.is_asynchronous:
        check_asynchronous(rollout, algorithm)
    if models is not None:
        rollout.engine.check_settings(models, generation)
    multi_turn = rollout.multi_turn
    if multi_turn is not None and multi_turn.turn_rewards == "last" and estimator in GROUP_ESTIMATORS:
        raise ValueError(
            f"rollout.multi_turn.turn_rewards='last' puts each turn's reward at the turn's last token, which "
            f"algorithm.advantage_estimator={estimator!r} (one advantage per sequence) cannot use: set "
            "turn_rewards: sum, or use gae or reinforce_pp"
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


def check_asynchronous(rollout: RolloutSettings, algorithm: AlgorithmSettings) -> None:
    """Asynchronous rollouts train tokens of older policies: only with the decoupled loss, recomputed
    proximal log-probs, and (for now) single-turn rollouts."""
    if algorithm.rollout_correction != "decoupled":
        raise ValueError(
            f"rollout.asynchronous.max_staleness={rollout.asynchronous.max_staleness} trains tokens sampled by "
            "older policies, which plain PPO on stale data does not correct (it collapses); set "
            f"algorithm.rollout_correction: decoupled (got {algorithm.rollout_correction!r}), or max_staleness: 0"
        )
    if rollout.recompute_old_log_probs is False:
        raise ValueError(
            "rollout.asynchronous needs the trainer's own old log-probs (the decoupled loss's proximal policy): "
            "leave rollout.recompute_old_log_probs null (or true)"
        )
    if getattr(rollout.engine, "generates_ahead", False) and rollout.asynchronous.carry_over:
        raise ValueError(
            f"rollout.engine {rollout.engine!r} generates whole rollouts one step ahead on its own devices; "
            "carry-over of partial rows is for a colocated engine: set rollout.asynchronous.carry_over: false"
        )
    if rollout.multi_turn is not None:
        raise ValueError(
            "rollout.asynchronous with rollout.multi_turn is not supported yet: carried-over rows are single-turn "
            "responses; drop one of the two groups"
        )


def critic_path(models: PPOModelSettings, rewards: Sequence[RewardComponent]) -> str:
    """Where the critic starts: ``critic_path``, else the first reward model's path, else the actor's."""
    if models.critic_path is not None:
        return models.critic_path
    reward_models = [component.path for component in rewards if isinstance(component, RewardModel)]
    return reward_models[0] if reward_models else models.actor_path


CRITIC_FIX = (
    ": set models.critic_path to a reward model (a *ForSequenceClassification checkpoint with the actor's "
    "tokenizer), or models.new_value_head: true to start the critic's value head at random"
)


def critic_new_head_ok(models: PPOModelSettings, critic_source: str) -> bool:
    """``models.new_value_head`` resolved: by default a new head only when the critic starts from the
    actor (no ``critic_path``, no reward model), which as a causal LM has none."""
    if models.new_value_head is not None:
        return models.new_value_head
    return models.critic_path is None and critic_source == models.actor_path


def check_critic_head(models: PPOModelSettings, critic_source: str) -> None:
    """Before any model loads: a critic source without a value head is an error unless a new head is allowed.

    Reads the checkpoint's ``config.json`` only; loading checks the weights themselves again.
    """
    if critic_new_head_ok(models, critic_source) or not os.path.isdir(critic_source):  # hub ids: checked at load
        return
    if has_scalar_head(critic_source, models) is not False:
        return
    role = "models.critic_path" if models.critic_path else "the critic's starting point"
    raise ValueError(f"{role} {critic_source!r} is a causal LM without the 'score' head a critic needs{CRITIC_FIX}")


def build_policy(
    models: PPOModelSettings,
    tokenizer: PreTrainedTokenizerBase,
    uses_critic: bool,
    critic_source: str,
    uses_reference: bool = True,
) -> PolicySet:
    """Load the actor, the critic (from ``critic_source``) and the frozen reference; check their heads.

    A reference-free run (``uses_reference`` False) builds no reference; with LoRA and no
    ``reference_path`` the reference is the actor with its adapter disabled (no second copy).
    """
    critic = None
    if uses_critic:
        role = "models.critic_path" if models.critic_path else "the critic's starting point"
        critic = CriticSpec(critic_source, role, critic_new_head_ok(models, critic_source), CRITIC_FIX)
    return PolicySet.build(
        models,
        tokenizer,
        models.actor_path,
        actor_role="models.actor_path",
        reference_path=models.reference_path,
        uses_reference=uses_reference,
        critic=critic,
    )


def check_writable(paths: dict[str, str]) -> None:
    """Each output directory can be written (its nearest existing parent is writable), before training.

    Raises:
        PermissionError: naming the setting and the directory.
    """
    for setting, path in paths.items():
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(
                f"{setting} {path!r} cannot be written ({existing!r} is not a writable directory); choose another"
            )


def check_tokenizers(
    models: PPOModelSettings,
    tokenizer: PreTrainedTokenizerBase,
    critic_source: str | None,
    uses_reference: bool = True,
) -> None:
    """The critic and the reference read the actor's token ids: their tokenizers must be the actor's."""
    reference = models.reference_path if uses_reference else None
    fix = ": the reference must be a policy with the actor's tokenizer (or leave it null)"
    others = {"the reference (models.reference_path)": (reference, fix), "the critic": (critic_source, CRITIC_FIX)}
    others = {role: (None if path == models.actor_path else path, fix) for role, (path, fix) in others.items()}
    PolicySet.check_tokenizers(tokenizer, others, models.trust_remote_code)


def check_prompt_lengths(datamodule, models: PPOModelSettings, max_new_tokens: int) -> None:
    """Prompts (after ``max_prompt_len``) plus ``max_new_tokens`` must fit the actor's position range."""
    from transformers import AutoConfig

    records = [*getattr(datamodule, "train_prompts", []), *getattr(datamodule, "val_prompts", [])]
    if not records or not hasattr(records[0], "ids"):
        return
    config = AutoConfig.from_pretrained(models.actor_path, trust_remote_code=models.trust_remote_code)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    limit = datamodule.hparams.max_prompt_len
    longest = min(max(len(r.ids) for r in records), limit)
    if positions and longest + max_new_tokens > positions:
        raise ValueError(
            f"prompts of up to {longest} tokens (data.max_prompt_len={limit}) plus generation.max_new_tokens="
            f"{max_new_tokens} exceed the actor's position range ({positions}, models.actor_path config): set "
            f"data.max_prompt_len <= {positions - max_new_tokens} (longer prompts are then left-truncated and "
            "counted in rollout/prompts_truncated) or lower generation.max_new_tokens"
        )


def check_token_ids(generation: GenerationSettings, models: PPOModelSettings) -> None:
    """``generation.suppress_token_ids`` and ``stop_token_ids`` must be ids of the actor's vocabulary
    (its ``config.json``), checked before any model loads (an id past the logits would fail mid-sampling)."""
    if not generation.suppress_token_ids and not generation.stop_token_ids:
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(models.actor_path, trust_remote_code=models.trust_remote_code)
    except (OSError, ValueError):  # loading the actor reports a missing or unreadable checkpoint
        return
    vocab_size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    for name in ("suppress_token_ids", "stop_token_ids"):
        outside = sorted(i for i in getattr(generation, name) if vocab_size is not None and i >= vocab_size)
        if outside:
            raise ValueError(
                f"generation.{name} {outside} are outside the actor's vocabulary ({vocab_size} ids, "
                f"0..{vocab_size - 1}, models.actor_path config): use ids the tokenizer gives, e.g. "
                "tokenizer.convert_tokens_to_ids(token)"
            )
