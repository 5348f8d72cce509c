"""PPOModule's set-up: checking setting combinations and loading the four models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_rlhf.functional import KL_ESTIMATORS
from lit_rlhf.models import Actor, LoadSettings, LoraSettings, ValueModel, load_tokenizer
from lit_rlhf.rollout.advantages import ADVANTAGE_ESTIMATORS


def validate_settings(hp: Any, custom_reward: bool) -> None:
    """Raise ``ValueError`` naming the settings of any invalid combination."""
    if hp.advantage_estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage_estimator {hp.advantage_estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    if hp.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {hp.kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if hp.kl_penalty not in ("reward", "loss"):
        raise ValueError(f"unknown kl_penalty {hp.kl_penalty!r}; valid: reward, loss")
    if hp.kl_penalty == "loss" and hp.kl_estimator == "k1":
        raise ValueError("kl_penalty='loss' with kl_estimator='k1' has no useful gradient; use k2 or k3")
    if hp.advantage_estimator in ("grpo", "dr_grpo", "rloo") and hp.n_samples_per_prompt < 2:
        raise ValueError(f"advantage_estimator={hp.advantage_estimator!r} needs n_samples_per_prompt >= 2")
    if hp.advantage_estimator == "grpo" and hp.whiten_advantages:
        raise ValueError("advantage_estimator='grpo' is already normalised; whiten_advantages=True would whiten twice")
    experiences = hp.rollout_batch_size * hp.n_samples_per_prompt
    if experiences % hp.mini_batch_size or hp.mini_batch_size % hp.micro_batch_size:
        raise ValueError(
            f"rollout_batch_size * n_samples_per_prompt ({experiences}) must be a multiple of mini_batch_size "
            f"({hp.mini_batch_size}), which must be a multiple of micro_batch_size ({hp.micro_batch_size})"
        )
    sources = sum([hp.reward_path is not None, hp.reward_fn is not None, custom_reward])
    if sources == 0:
        raise ValueError("no reward: set reward_path, or reward_fn, or override compute_reward in a subclass")
    if hp.reward_fn is not None and custom_reward:
        raise ValueError("both reward_fn and a compute_reward override are set; keep one")
    if hp.normalize_reward and hp.reward_path is None:
        raise ValueError("normalize_reward=True uses the reward model's statistics but reward_path is not set")
    if hp.load_in_4bit and hp.lora_rank == 0:
        raise ValueError("load_in_4bit=True trains through a LoRA adapter; set lora_rank > 0")
    for name in ("clip_eps", "ppo_epochs", "rollout_batch_size", "score_micro_batch_size"):
        if getattr(hp, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(hp, name)}")


@dataclass
class PPOModels:
    actor: Actor
    critic: ValueModel | None
    reference: Actor | None
    reward_model: ValueModel | None
    reward_tokenizer: PreTrainedTokenizerBase | None
    reward_shares_tokenizer: bool


def load_settings(hp: Any) -> tuple[LoadSettings, LoadSettings]:
    """How the trainable (actor, critic) and the frozen (reference, reward) models are loaded."""
    lora = LoraSettings(hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules)
    trainable = LoadSettings(hp.dtype, hp.attn_implementation, lora, hp.load_in_4bit, hp.gradient_checkpointing)
    return trainable, LoadSettings(hp.dtype, hp.attn_implementation, load_in_4bit=hp.load_in_4bit)


def build_models(hp: Any, uses_critic: bool, need_reward_model: bool) -> PPOModels:
    """Load actor, critic, reference and reward model; freeze the last two."""
    trainable, frozen = load_settings(hp)
    lora = trainable.lora
    tokenizer = load_tokenizer(hp.actor_path)
    actor = Actor.from_pretrained(hp.actor_path, tokenizer, trainable)
    reference = None
    if hp.reference_path is not None or not lora.enabled:
        reference = freeze(Actor.from_pretrained(hp.reference_path or hp.actor_path, tokenizer, frozen))
    critic = None
    if uses_critic:
        critic = ValueModel.from_pretrained(hp.critic_path or hp.reward_path or hp.actor_path, trainable)
    reward_model, reward_tokenizer, shares = None, None, False
    if need_reward_model:
        reward_model = freeze(ValueModel.from_pretrained(hp.reward_path, frozen))
        reward_tokenizer = load_tokenizer(hp.reward_path, padding_side="right")
        shares = reward_tokenizer.get_vocab() == tokenizer.get_vocab()
    for model in (actor, critic, reference, reward_model):
        if model is not None:
            model.padding_free = hp.padding_free
    return PPOModels(actor, critic, reference, reward_model, reward_tokenizer, shares)


def freeze(model):
    """Eval mode, no gradients: a frozen model is never trained and never in an optimizer."""
    model.eval()
    model.requires_grad_(False)
    return model
