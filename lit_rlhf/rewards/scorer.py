"""RewardScorer: a generation's sequence scores, from the reward components (or a custom reward) and
the shaping PPO trains on (missing-EOS penalty, clipping)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lit_rlhf.models.actor import GenerationOutput, response_texts
from lit_rlhf.rewards.base import (
    RewardBatch,
    RewardComponent,
    RewardError,
    score_components,
    to_scores,
    warn_large_scores,
)
from lit_rlhf.rewards.inputs import call_with_columns
from lit_rlhf.settings import AlgorithmSettings

# (prompts, responses, **columns) -> scores [B]: a compute_reward override
CustomReward = Callable[..., Any]


class Scores(NamedTuple):
    """A rollout's sequence scores.

    scores: ``[B]`` what PPO trains on (the reward after shaping: missing-EOS penalty, clipping).
    parts: ``[B]`` tensors logged as ``reward/<key>``: ``score`` (the weighted sum before shaping)
        and each reward component's own score.
    """

    scores: Tensor
    parts: dict[str, Tensor]


class RewardScorer:
    """Scores sampled responses: the reward, then the missing-EOS penalty, then clipping.

    The reward is the weighted sum of ``components`` (which read the actor's token ids directly, so
    a reward model with the actor's vocabulary needs no decoding), or ``custom(prompts, responses,
    **columns)`` when given (a ``PPOModule.compute_reward`` override, named ``custom_name`` in
    errors). Large unclipped scores are warned about once (:func:`warn_large_scores`).

    Args:
        components: the reward components (the module's submodules: they move with it).
        algorithm: the shaping settings (``missing_eos_penalty``, ``reward_clip``).
        tokenizer: the actor's (responses are decoded with it, and components set up with it).
        custom: a custom reward replacing the components' sum.
        custom_name: the custom reward's name in errors.
    """

    def __init__(
        self,
        components: Sequence[RewardComponent],
        algorithm: AlgorithmSettings,
        tokenizer: Any,
        custom: CustomReward | None = None,
        custom_name: str = "compute_reward",
    ) -> None:
        self.components, self.algorithm, self.tokenizer = components, algorithm, tokenizer
        self.custom, self.custom_name = custom, custom_name
        self.component_scores: dict[str, Tensor] = {}  # the latest scoring call's, per component
        self.scale_warned = False

    def setup(self, models: Any) -> None:
        """Load what the components need (a reward model, a client); a custom reward loads on first use."""
        if self.custom is None:
            for component in self.components:
                component.ensure_setup(self.tokenizer, models)

    def decode(self, gen: GenerationOutput) -> list[str]:
        """Response texts: every response token the rows attend to (special tokens dropped)."""
        return response_texts(self.tokenizer, gen.sequences, gen.attention_mask, gen.num_actions)

    def reward_sum(self, batch: RewardBatch, device: torch.device, models: Any = None) -> Tensor:
        """``sum(weight * score)`` over the components; each one's scores are kept for logging."""
        for component in self.components:
            if not component.is_set_up:  # only a custom reward gets here with one not loaded
                component.ensure_setup(self.tokenizer, models)
                component.to(device)
        scores = score_components(self.components, batch, device)
        self.component_scores.update(scores)
        total = torch.zeros(len(batch), device=device)
        for component in self.components:
            total = total + component.weight * scores[component.name]
        return total

    def __call__(
        self,
        gen: GenerationOutput,
        prompts: list[str],
        columns: dict[str, list],
        responses: list[str] | None = None,
        completions: list | None = None,
        environment_rewards: Tensor | None = None,
    ) -> Scores:
        """The scores of ``gen``'s rows. A multi-turn rollout passes each row's final assistant text as
        ``responses``, its turns as ``completions`` and the environments' rewards, added to the reward
        before shaping (``reward/environment``)."""
        device = gen.sequences.device
        texts = responses if responses is not None else (lambda: self.decode(gen))
        batch = RewardBatch(prompts, texts, columns, gen.sequences, gen.attention_mask, completions=completions)
        self.component_scores = {}
        if self.custom is not None:
            try:
                columns_in = batch.columns_with_messages()  # with prompt_messages, which super() passes on
                out = call_with_columns(self.custom, batch.prompts, batch.responses, columns_in)
            except RewardError:
                raise
            except Exception as err:
                raise RewardError(f"reward {self.custom_name} raised {type(err).__name__}: {err}") from err
            raw = to_scores(out, self.custom_name, batch, device)
        else:
            raw = self.reward_sum(batch, device)
        parts = {"score": raw, **self.component_scores}
        if environment_rewards is not None:
            raw = raw + environment_rewards.to(device)
            parts = {"score": raw, "environment": environment_rewards.to(device), **self.component_scores}
        if not self.scale_warned and self.algorithm.reward_clip is None:
            self.scale_warned = warn_large_scores(raw)
        scores = raw
        if self.algorithm.missing_eos_penalty is not None:
            # ended by itself (an EOS, a stop token or string): only rows cut at max_new_tokens are penalised
            scores = torch.where(gen.finished, scores, scores - self.algorithm.missing_eos_penalty)
        if self.algorithm.reward_clip is not None:
            scores = scores.clamp(-self.algorithm.reward_clip, self.algorithm.reward_clip)
        return Scores(scores, parts)
