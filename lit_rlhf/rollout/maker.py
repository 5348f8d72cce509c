"""One rollout: prompts in, a filled ``Experience`` out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lit_rlhf.models import Actor, GenerationOutput, ValueModel
from lit_rlhf.models.padding import length_groups
from lit_rlhf.models.sharding import gathered
from lit_rlhf.rollout.advantages import AllReduce, compute_advantages, no_reduce
from lit_rlhf.rollout.experience import Experience
from lit_rlhf.settings import AlgorithmSettings, GenerationSettings, KLSettings, RolloutSettings


class Scores(NamedTuple):
    """A rollout's sequence scores.

    scores: ``[B]`` what PPO trains on (the reward after shaping: missing-EOS penalty, clipping).
    parts: ``[B]`` tensors logged as ``reward/<key>``: ``score`` (the weighted sum before shaping)
        and each reward component's own score.
    """

    scores: Tensor
    parts: dict[str, Tensor]


# (generation, prompt texts per row, dataset columns per row) -> scores
ScoreFn = Callable[[GenerationOutput, list[str], dict[str, list]], Scores]
# (phase, done, total): a progress display
Progress = Callable[[str, int, int], None]


def no_progress(phase: str, done: int, total: int) -> None:
    """Report nothing."""


class Rollout(NamedTuple):
    experience: Experience
    reward_parts: dict[str, Tensor]
    timing: dict[str, float]


@dataclass
class RolloutModels:
    """The models a rollout reads. ``reference=None`` means the actor with its LoRA adapter disabled;
    ``uses_reference=False`` (a reference-free run, ``kl.coef: 0``) means no reference forward at all."""

    actor: Actor
    critic: ValueModel | None
    reference: Actor | None
    uses_reference: bool = True


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None):
    """Put modules in eval mode (no dropout, no grad-only behaviour), restoring their modes after."""
    live = [m for m in modules if m is not None]
    modes = [m.training for m in live]
    for m in live:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(live, modes, strict=True):
            m.train(mode)


def in_micro_batches(
    fn: Callable[[Tensor, Tensor], Tensor],
    gen: GenerationOutput,
    groups: list[Tensor],
    tick: Callable[[], None] = lambda: None,
) -> Tensor:
    """``fn(sequences, attention_mask)`` over the row ``groups`` (``tick`` after each), in the rows' order."""
    outputs = []
    for rows in groups:
        outputs.append(fn(gen.sequences[rows], gen.attention_mask[rows]))
        tick()
    order = torch.cat(groups)
    return torch.cat(outputs)[torch.argsort(order)]


def reference_log_probs(
    actor: Actor,
    reference: Actor | None,
    sequences: Tensor,
    attention_mask: Tensor,
    num_actions: int,
    temperature: float,
) -> Tensor:
    """Reference-policy log-probs ``[B, A]``: the reference model, or the actor with its adapter disabled."""
    if reference is not None:
        return reference(sequences, attention_mask, num_actions, temperature)
    with actor.adapter_disabled():
        return actor(sequences, attention_mask, num_actions, temperature)


def scoring_groups(lengths: Tensor, rollout: RolloutSettings, reduce_max: AllReduce = no_reduce) -> list[Tensor]:
    """The rows of each scoring forward: similar lengths together; the same number of forwards on every rank."""
    size, tokens = rollout.score_micro_batch_size, rollout.score_micro_batch_tokens
    groups = length_groups(lengths, size, tokens)
    count = int(reduce_max(torch.tensor(len(groups), device=lengths.device)))
    return length_groups(lengths, size, tokens, count) if count != len(groups) else groups


def repeat_rows(values: list, times: int) -> list:
    """Each entry ``times`` times in a row (a prompt's samples stay contiguous)."""
    return [value for value in values for _ in range(times)]


@torch.no_grad()
def make_experience(
    models: RolloutModels,
    prompts: dict,
    score_fn: ScoreFn,
    *,
    generation: GenerationSettings,
    rollout: RolloutSettings,
    algorithm: AlgorithmSettings,
    kl: KLSettings,
    kl_coef: float,
    rollout_id: int,
    generator: torch.Generator | None = None,
    all_reduce: AllReduce = no_reduce,
    progress: Progress = no_progress,
    reduce_max: AllReduce = no_reduce,
) -> Rollout:
    """Generate, score and compute advantages for one batch of left-padded prompts.

    ``prompts`` is what ``PromptDataModule.rollout_prompts`` returns: ``input_ids``/``attention_mask``
    ``[N, P]``, the rendered prompt texts (``prompts``) and the records' other fields (``columns``).

    1. Repeat each prompt ``generation.n_samples_per_prompt`` times (a prompt's samples stay
       contiguous), with its text and columns.
    2. Generate with the actor (eval mode, no grad); a sharded actor's weights are gathered once
       for the whole generation, not per token (``rollout.gather_for_generation``).
    3. Score forwards in micro-batches: reference log-probs (reference model, or the actor with its
       adapter disabled; none in a reference-free run), values (critic, if any). Old log-probs are
       the ones the sampler computed while decoding (equal to a full forward's within float
       tolerance), unless ``rollout.recompute_old_log_probs`` asks for a separate actor forward.
    4. Sequence scores through ``score_fn`` (the reward components, or a ``compute_reward`` override).
    5. KL, token rewards, advantages and returns with ``lit_rlhf.functional``.

    ``progress(phase, done, total)`` hears about each decoding step and each scoring forward.
    """
    actor, critic, reference = models.actor, models.critic, models.reference
    temperature, micro, n = (
        generation.scoring_temperature,
        rollout.score_micro_batch_size,
        generation.n_samples_per_prompt,
    )
    # 1.
    input_ids = prompts["input_ids"].repeat_interleave(n, dim=0)
    attention_mask = prompts["attention_mask"].repeat_interleave(n, dim=0)
    texts = repeat_rows(prompts["prompts"], n)
    columns = {name: repeat_rows(values, n) for name, values in prompts["columns"].items()}
    with eval_mode(actor, critic, reference):
        # 2.
        start = time.perf_counter()
        on_token = lambda done, total: progress("generating", done, total)  # noqa: E731
        if rollout.engine == "native":
            with gathered(actor.model, rollout.gather_for_generation):
                gen = actor.generate(input_ids, attention_mask, generation, generator=generator, on_token=on_token)
        else:  # the engine has the actor's weights (pushed before the rollout); seeds from the same generator
            seed = int(
                torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device if generator else None)
            )
            gen = rollout.engine.generate(input_ids, attention_mask, generation, seed)
        generation_s = time.perf_counter() - start
        num_actions = gen.action_mask.shape[1]
        # 3.
        start = time.perf_counter()
        micro = scoring_groups(gen.attention_mask.sum(-1), rollout, reduce_max)
        per_group = models.uses_reference + rollout.recomputes_old_log_probs + (critic is not None)
        forwards = len(micro) * per_group + 1  # + the rewards
        done = [0]

        def tick() -> None:
            done[0] += 1
            progress("scoring", done[0], forwards)

        if rollout.recomputes_old_log_probs:
            old_log_probs = in_micro_batches(lambda s, m: actor(s, m, num_actions, temperature), gen, micro, tick)
        else:  # the sampler's own log-probs: the same weights and temperature, one forward pass fewer
            old_log_probs = gen.log_probs
        ref_log_probs = None
        if models.uses_reference:
            ref_log_probs = in_micro_batches(
                lambda s, m: reference_log_probs(actor, reference, s, m, num_actions, temperature), gen, micro, tick
            )
        if critic is not None:
            values = in_micro_batches(lambda s, m: critic(s, m, num_actions), gen, micro, tick)
        else:
            values = torch.zeros_like(old_log_probs)
        checked = {"old_log_probs": old_log_probs, "ref_log_probs": ref_log_probs, "values": values}
        check_finite(rollout_id, gen.action_mask, **{k: v for k, v in checked.items() if v is not None})
        # 4.
        scores, reward_parts = score_fn(gen, texts, columns)
        tick()
        scoring_s = time.perf_counter() - start
    # 5.
    start = time.perf_counter()
    token_kl, rewards, advantages, returns = compute_advantages(
        scores, old_log_probs, ref_log_probs, values, gen.action_mask, kl_coef, algorithm, kl, n, all_reduce
    )
    experience = Experience(
        sequences=gen.sequences,
        attention_mask=gen.attention_mask,
        action_mask=gen.action_mask,
        old_log_probs=old_log_probs,
        rollout_log_probs=gen.log_probs,
        ref_log_probs=ref_log_probs,
        values=values,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        scores=scores,
        kl=token_kl,
        rollout_id=torch.full_like(scores, rollout_id, dtype=torch.long),
    )
    timing = {
        "generation_s": generation_s,
        "scoring_s": scoring_s,
        "advantages_s": time.perf_counter() - start,
        "generated_tokens": float(gen.action_mask.sum()),
    }
    return Rollout(experience, reward_parts, timing)


def check_finite(rollout_id: int, action_mask: Tensor, **tensors: Tensor) -> None:
    """Stop before training on non-finite log-probs or values (one host sync for all of them).

    Raises:
        FloatingPointError: naming the tensor and the rollout.
    """
    finite = torch.stack([torch.where(action_mask, t, 0.0).isfinite().all() for t in tensors.values()])
    if not bool(finite.all()):
        name = next(n for n, ok in zip(tensors, finite.tolist(), strict=True) if not ok)
        raise FloatingPointError(
            f"rollout {rollout_id}: the {name} of the sampled responses are not finite, so the model that made "
            "them has non-finite weights (did training diverge?); nothing was trained on them"
        )


def ends_with_eos(sequences: Tensor, action_mask: Tensor, eos_token_ids: Tensor) -> Tensor:
    """``[B]`` bool: the response's last valid token is an EOS (it was not cut at max_new_tokens)."""
    last = action_mask.long().sum(-1).clamp_min(1) - 1
    responses = sequences[:, -action_mask.shape[1] :]
    return torch.isin(responses.gather(1, last.unsqueeze(1)).squeeze(1), eos_token_ids)


def rollout_metrics(
    experience: Experience,
    reward_parts: dict[str, Tensor],
    eos_token_ids: Tensor,
    all_reduce: AllReduce = no_reduce,
) -> dict[str, Tensor]:
    """Reward, KL, length and EOS statistics of a rollout, reduced over all ranks (one all-reduce).

    ``reward/mean`` and ``reward/std`` are of the trained-on scores (after shaping); ``reward/<key>``
    is the mean of each of ``reward_parts`` (``score``, the sum before shaping, and each component).
    A reference-free rollout (no ``ref_log_probs``) has no ``rollout/kl``.
    """
    mask = experience.action_mask
    lengths = mask.sum(-1).float()
    has_eos = ends_with_eos(experience.sequences, mask, eos_token_ids)
    reference_free = experience.ref_log_probs is None
    ref_log_probs = experience.old_log_probs if reference_free else experience.ref_log_probs
    k1_kl = torch.where(mask, experience.old_log_probs - ref_log_probs, 0.0).sum(-1)
    scores = experience.scores
    rows = torch.stack([scores, scores.square(), k1_kl, lengths, has_eos.float(), *reward_parts.values()])
    sums = all_reduce(torch.cat([rows.sum(-1), torch.tensor([float(len(experience))], device=rows.device)]))
    count = sums[-1]
    mean = sums[:-1] / count
    var = (sums[1] - count * mean[0].square()).clamp_min(0) / (count - 1).clamp_min(1)
    metrics = {
        "reward/mean": mean[0],
        "reward/std": var.sqrt(),
        "rollout/kl": mean[2],
        "rollout/response_length": mean[3],
        "rollout/eos_rate": mean[4],
    }
    metrics.update({f"reward/{key}": value for key, value in zip(reward_parts, mean[5:], strict=True)})
    if reference_free:
        del metrics["rollout/kl"]
    return metrics


def mismatch_metrics(experience: Experience, all_reduce: AllReduce = no_reduce, reduce_max: AllReduce = no_reduce):
    """How far the sampler's log-probs are from the trainer's old ones (valid tokens of all ranks).

    ``rollout/logprob_abs_diff`` (mean, ``_max``) and the importance ratio ``exp(old - rollout)``
    (``rollout/importance_ratio`` mean, ``_max``): what ``algorithm.rollout_correction: tis`` corrects.
    """
    mask = experience.action_mask
    diff = (experience.old_log_probs - experience.rollout_log_probs).float()
    ratio = torch.where(mask, diff.exp(), 0.0)
    absolute = torch.where(mask, diff.abs(), 0.0)
    sums = all_reduce(torch.stack([absolute.sum(), ratio.sum(), mask.sum().float()]))
    maxima = reduce_max(torch.stack([absolute.max(), ratio.max()]))
    return {
        "rollout/logprob_abs_diff": sums[0] / sums[2],
        "rollout/logprob_abs_diff_max": maxima[0],
        "rollout/importance_ratio": sums[1] / sums[2],
        "rollout/importance_ratio_max": maxima[1],
    }
