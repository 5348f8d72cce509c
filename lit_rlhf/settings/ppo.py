"""The rollout and PPO groups: generation, rollouts and their engine, the algorithm, the KL penalty."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lit_rlhf.plain_data import as_group, import_object
from lit_rlhf.rollout.engines.base import RolloutEngine
from lit_rlhf.settings.asynchronous import AsyncSettings
from lit_rlhf.settings.common import CRITIC_FREE, AdvantageEstimator, KLEstimator, _check, _choice
from lit_rlhf.settings.multi_turn import MultiTurnSettings


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How responses are sampled. These always win over a checkpoint's ``generation_config.json``."""

    max_new_tokens: int = 64
    """response length limit ``A``."""
    temperature: float = 1.0
    """sampling temperature of the rollouts; log-probs use the same one (must be > 0 for training)."""
    top_p: float = 1.0
    """nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """sample only from the k most likely tokens (0 = off)."""
    n_samples_per_prompt: int = 1
    """responses per prompt (a prompt's samples stay contiguous: the groups of group estimators)."""
    stop_at_eos: bool = True
    """stop decoding once every row has produced an EOS token."""
    suppress_token_ids: tuple[int, ...] = ()
    """token ids that are never sampled (e.g. pad/bos; EOS for fixed-length responses)."""
    stop_token_ids: tuple[int, ...] = ()
    """token ids that end a row like an EOS, in addition to the tokenizer's EOS (e.g. a tool-call
    close tag); the stop token is the row's last sampled token."""
    stop_strings: tuple[str, ...] = ()
    """a row ends (finished, like an EOS) at the token whose text completes one of these; that token is
    kept and the response text contains the string (e.g. ``["\\n\\n"]``)."""
    val_temperature: float | None = None
    """validation sampling temperature (None = ``temperature``; 0 = greedy)."""

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "generation", "max_new_tokens", self.max_new_tokens, ">= 1")
        _check(self.temperature >= 0, "generation", "temperature", self.temperature, ">= 0")
        _check(0 < self.top_p <= 1, "generation", "top_p", self.top_p, "in (0, 1]")
        _check(self.top_k >= 0, "generation", "top_k", self.top_k, ">= 0 (0 = off)")
        n = self.n_samples_per_prompt
        _check(n >= 1, "generation", "n_samples_per_prompt", n, ">= 1")
        ids = tuple(self.suppress_token_ids or ())
        _check(all(isinstance(i, int) and i >= 0 for i in ids), "generation", "suppress_token_ids", ids, "ids >= 0")
        object.__setattr__(self, "suppress_token_ids", ids)
        stop_ids = tuple(self.stop_token_ids or ())
        _check(
            all(isinstance(i, int) and i >= 0 for i in stop_ids), "generation", "stop_token_ids", stop_ids, "ids >= 0"
        )
        object.__setattr__(self, "stop_token_ids", stop_ids)
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings or ())
        _check(all(isinstance(s, str) and s for s in stops), "generation", "stop_strings", stops, "non-empty strings")
        object.__setattr__(self, "stop_strings", stops)
        if self.val_temperature is not None:
            _check(self.val_temperature >= 0, "generation", "val_temperature", self.val_temperature, ">= 0")

    @property
    def scoring_temperature(self) -> float:
        """Temperature for log-probs: the sampling one (1.0 for greedy decoding)."""
        return self.temperature if self.temperature > 0 else 1.0

    def for_validation(self) -> GenerationSettings:
        """The same settings at ``val_temperature``, one sample per prompt."""
        temperature = self.temperature if self.val_temperature is None else self.val_temperature
        return dataclasses.replace(self, temperature=temperature, n_samples_per_prompt=1)


ENGINE_SHORTHANDS = {"native": "lit_rlhf.rollout.engines.native.NativeEngine"}  # rollout.engine: <name>


@dataclass(frozen=True, kw_only=True)
class RolloutSettings:
    """How a rollout is made (per rank)."""

    engine: Literal["native"] | RolloutEngine = "native"
    """what generates the responses: an engine component (``lit_rlhf.rollout.NativeEngine``, the actor's
    own sampler, or ``lit_rlhf.rollout.VLLMEngine``, which receives the actor's weights before every
    rollout); ``native`` is a shorthand for a ``NativeEngine``."""
    rollout_batch_size: int = 64
    """prompts per rollout on each rank (experiences = this x ``generation.n_samples_per_prompt``)."""
    score_micro_batch_size: int = 16
    """rows per no-grad scoring forward (old/reference log-probs, values); rows of similar length go
    together, so each forward computes little padding."""
    score_micro_batch_tokens: int | None = None
    """also cut a scoring micro-batch before its rows x its longest row pass this many tokens
    (dynamic batching for long-tailed lengths; None = rows only)."""
    recompute_old_log_probs: bool | None = None
    """compute the old log-probs with a trainer forward instead of reusing the sampler's (None: only
    with an engine, whose kernels differ slightly from the trainer's; the native sampler's equal a
    forward's within float tolerance, so it saves that forward)."""
    gather_for_generation: bool = True
    """under FSDP2, gather the actor's full weights once per rollout for generation (one extra
    full copy of the actor per rank while generating) instead of all-gathering every layer for
    every generated token (slow, but no extra memory)."""
    multi_turn: MultiTurnSettings | None = None
    """multi-turn rollouts with tools or an environment (absent: one response per prompt)."""
    weight_check_tolerance: float | None = 0.5
    """after every weight push to an engine that samples with weights of its own (vLLM), the engine
    samples 16 tokens after a fixed prompt and the trainer scores them: a mean |log-prob difference|
    above this stops the run (stale or unloaded weights never pass silently; kernel differences are
    far smaller: ~1e-5 in fp32, ~1e-2 in bf16). None: no check."""
    asynchronous: AsyncSettings | None = None
    """partial rollouts with carry-over and bounded staleness (absent, or ``max_staleness: 0``: synchronous
    rollouts, bit for bit)."""

    def __post_init__(self) -> None:
        if self.multi_turn is not None:
            object.__setattr__(self, "multi_turn", as_group(MultiTurnSettings, self.multi_turn))
        if self.asynchronous is not None:
            object.__setattr__(self, "asynchronous", as_group(AsyncSettings, self.asynchronous))
        if isinstance(self.engine, Mapping):  # {class_path, init_args}, as in checkpoints
            engine = import_object(self.engine["class_path"], "rollout.engine")(**self.engine.get("init_args", {}))
            object.__setattr__(self, "engine", engine)
        if isinstance(self.engine, str) and self.engine in ENGINE_SHORTHANDS:
            # a lazy instance: a config that leaves the default dumps it as {class_path, init_args}
            from jsonargparse import lazy_instance

            engine_class = import_object(ENGINE_SHORTHANDS[self.engine], "rollout.engine")  # loads transformers
            object.__setattr__(self, "engine", lazy_instance(engine_class))
        if not isinstance(self.engine, RolloutEngine):
            raise ValueError(
                "rollout.engine must be 'native' or an engine (lit_rlhf.rollout.NativeEngine, "
                f"lit_rlhf.rollout.VLLMEngine), got {self.engine!r}"
            )
        _check(self.rollout_batch_size >= 1, "rollout", "rollout_batch_size", self.rollout_batch_size, ">= 1")
        size = self.score_micro_batch_size
        _check(size >= 1, "rollout", "score_micro_batch_size", size, ">= 1")
        if self.score_micro_batch_tokens is not None:
            tokens = self.score_micro_batch_tokens
            _check(tokens >= 1, "rollout", "score_micro_batch_tokens", tokens, ">= 1 (or null)")
        if self.weight_check_tolerance is not None:
            tolerance = self.weight_check_tolerance
            _check(tolerance > 0, "rollout", "weight_check_tolerance", tolerance, "> 0 (or null for no check)")

    @property
    def is_asynchronous(self) -> bool:
        """Whether rollouts carry rows over and may train stale tokens (``asynchronous.max_staleness > 0``)."""
        return self.asynchronous is not None and self.asynchronous.active

    @property
    def recomputes_old_log_probs(self) -> bool:
        """``recompute_old_log_probs`` resolved: by default as the engine says (not for the native sampler);
        always in an asynchronous run (the proximal policy of the decoupled loss is the current one)."""
        if self.is_asynchronous:
            return True
        if self.recompute_old_log_probs is None:
            return self.engine.recomputes_old_log_probs
        return self.recompute_old_log_probs


@dataclass(frozen=True, kw_only=True)
class AlgorithmSettings:
    """The PPO algorithm: advantages, losses, updates per rollout, and reward shaping."""

    advantage_estimator: AdvantageEstimator = "gae"
    """``gae`` (with a critic), or critic-free ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``."""
    gamma: float = 1.0
    """discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool | None = None
    """whiten advantages over the rollout (None = on, except for ``grpo``, whose advantages are
    already normalised per group)."""
    clip_eps: float = 0.2
    """PPO ratio clip: the ratio is kept in [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """upper ratio clip (None = ``clip_eps``)."""
    dual_clip: float | None = None
    """dual-clip bound c > 1 on the loss of negative-advantage tokens (None = off)."""
    value_clip_eps: float | None = 0.2
    """value clip around the rollout's values (None = unclipped value loss)."""
    entropy_coef: float = 0.0
    """weight of the entropy bonus."""
    mini_batch_size: int = 64
    """experiences per optimizer step (on each rank)."""
    micro_batch_size: int = 16
    """experiences per forward/backward; gradients accumulate to a mini-batch (token mean over it).
    Rows of similar length go together, so each forward computes little padding."""
    micro_batch_tokens: int | None = None
    """also cut a micro-batch before its rows x its longest row pass this many tokens (dynamic
    batching; the loss stays the token mean over the whole mini-batch; None = rows only)."""
    ppo_epochs: int = 1
    """passes over each rollout's experiences."""
    missing_eos_penalty: float | None = None
    """subtracted from the score of responses cut at ``max_new_tokens`` (None = off)."""
    reward_clip: float | None = None
    """clamp scores to [-reward_clip, reward_clip] after the penalty (None = off)."""
    rollout_correction: Literal["none", "tis", "decoupled"] = "none"
    """``tis``: weight each token's policy loss by the truncated importance ratio between the trainer's
    old log-probs and the rollout engine's (corrects their small mismatch; needs recomputed old log-probs).
    ``decoupled``: the decoupled PPO objective of asynchronous RL: the ratio is taken against the
    proximal policy (the trainer's recomputed old log-probs) and each token's loss is weighted by the
    truncated behaviour weight π_prox/μ, μ being the policy that sampled it (``functional.behaviour_weights``;
    ``rollout_correction_level`` picks per token or per sequence; with μ = π_prox it is plain PPO)."""
    rollout_correction_cap: float = 2.0
    """the truncation of the TIS and behaviour weights: they are at most this (>= 1)."""
    rollout_correction_level: Literal["token", "sequence"] = "token"
    """``decoupled``: one behaviour weight per token, or one per sequence (the product of its tokens' ratios)."""

    def __post_init__(self) -> None:
        valid = ("gae", *CRITIC_FREE)
        _choice(self.advantage_estimator, valid, "algorithm", "advantage_estimator")
        _check(0.0 <= self.gamma <= 1.0, "algorithm", "gamma", self.gamma, "in [0, 1]")
        _check(0.0 <= self.lam <= 1.0, "algorithm", "lam", self.lam, "in [0, 1]")
        _check(0.0 < self.clip_eps < 1.0, "algorithm", "clip_eps", self.clip_eps, "in (0, 1)")
        if self.clip_eps_high is not None:
            _check(self.clip_eps_high > 0, "algorithm", "clip_eps_high", self.clip_eps_high, "> 0")
        if self.dual_clip is not None:
            _check(self.dual_clip > 1.0, "algorithm", "dual_clip", self.dual_clip, "> 1 (or null to turn it off)")
        if self.value_clip_eps is not None:
            _check(self.value_clip_eps > 0, "algorithm", "value_clip_eps", self.value_clip_eps, "> 0")
        _check(self.entropy_coef >= 0, "algorithm", "entropy_coef", self.entropy_coef, ">= 0")
        for name in ("mini_batch_size", "micro_batch_size", "ppo_epochs"):
            _check(getattr(self, name) >= 1, "algorithm", name, getattr(self, name), ">= 1")
        if self.micro_batch_tokens is not None:
            _check(self.micro_batch_tokens >= 1, "algorithm", "micro_batch_tokens", self.micro_batch_tokens, ">= 1")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                f"algorithm.mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                f"algorithm.micro_batch_size ({self.micro_batch_size})"
            )
        if self.missing_eos_penalty is not None:
            _check(self.missing_eos_penalty >= 0, "algorithm", "missing_eos_penalty", self.missing_eos_penalty, ">= 0")
        if self.reward_clip is not None:
            _check(self.reward_clip > 0, "algorithm", "reward_clip", self.reward_clip, "> 0")
        _choice(self.rollout_correction, ("none", "tis", "decoupled"), "algorithm", "rollout_correction")
        _choice(self.rollout_correction_level, ("token", "sequence"), "algorithm", "rollout_correction_level")
        if self.rollout_correction_level == "sequence" and self.rollout_correction != "decoupled":
            raise ValueError(
                "algorithm.rollout_correction_level='sequence' weights whole sequences of the decoupled loss; "
                f"it needs algorithm.rollout_correction: decoupled (got {self.rollout_correction!r})"
            )
        cap = self.rollout_correction_cap
        _check(cap >= 1, "algorithm", "rollout_correction_cap", cap, ">= 1")
        if self.advantage_estimator == "grpo" and self.whiten_advantages:
            raise ValueError(
                "algorithm.advantage_estimator='grpo' is already normalised per group; "
                "whiten_advantages=true would whiten twice (leave it null)"
            )

    @property
    def whiten(self) -> bool:
        """``whiten_advantages`` resolved: on by default, except for ``grpo``."""
        if self.whiten_advantages is None:
            return self.advantage_estimator != "grpo"
        return self.whiten_advantages

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator not in CRITIC_FREE


@dataclass(frozen=True, kw_only=True)
class KLSettings:
    """The KL penalty to the reference policy."""

    coef: float = 0.05
    """KL coefficient beta (the initial value when adaptive); 0 = a reference-free run: no reference
    model is loaded and no reference log-probs are computed (``rollout/kl`` and ``val/kl`` are not logged)."""
    estimator: KLEstimator = "k1"
    """``k1``, ``k2`` or ``k3``: the per-token KL put in the reward or the loss, and logged."""
    penalty: Literal["reward", "loss"] = "reward"
    """``reward``: per-token penalty in the reward; ``loss``: added to the policy loss (k2/k3)."""
    target: float | None = None
    """target KL per sequence (nats) of the adaptive controller (None = fixed coefficient)."""
    horizon: int = 10000
    """adaptive controller horizon, in samples."""

    def __post_init__(self) -> None:
        _check(self.coef >= 0, "kl", "coef", self.coef, ">= 0")
        _choice(self.estimator, ("k1", "k2", "k3"), "kl", "estimator")
        _choice(self.penalty, ("reward", "loss"), "kl", "penalty")
        if self.penalty == "loss" and self.estimator == "k1":
            raise ValueError("kl.penalty='loss' with kl.estimator='k1' has no useful gradient; use k2 or k3")
        if self.target is not None:
            _check(self.target > 0, "kl", "target", self.target, "> 0")
        _check(self.horizon >= 1, "kl", "horizon", self.horizon, ">= 1")
        if self.target is not None and self.coef == 0:
            raise ValueError(
                "kl.target with kl.coef=0: the adaptive controller scales the coefficient and cannot leave 0; "
                "start it from kl.coef > 0 (e.g. 0.05) or drop kl.target for a reference-free run"
            )

    @property
    def uses_reference(self) -> bool:
        """Whether the run needs the reference policy: ``coef: 0`` (TRL's GRPO default beta = 0) puts no KL
        in the reward or the loss, so no reference is built and no reference forward runs."""
        return self.coef > 0
