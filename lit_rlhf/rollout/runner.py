"""RolloutRunner: one rollout in two steps, ``sample`` (prompts -> engine -> samples) and ``score``
(old/reference log-probs, values, rewards and shaping, KL, advantages) -> ``Experience``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lit_rlhf.models import GenerationOutput
from lit_rlhf.models.padding import length_groups
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.models.sharding import gathered
from lit_rlhf.models.stop_strings import StopStrings
from lit_rlhf.rollout.advantages import AllReduce, compute_advantages, no_reduce
from lit_rlhf.rollout.asynchronous import AsynchronousRollouts
from lit_rlhf.rollout.batches import (  # noqa: F401  (Sampled, Rollout, ... are importable from here too)
    Carried,
    Progress,
    PromptsAt,
    Rollout,
    Sampled,
    ScoreFn,
    eval_mode,
    no_progress,
    repeat_rows,
)
from lit_rlhf.rollout.carry_over import CarryOver
from lit_rlhf.rollout.engines.base import GenerationRequest, RolloutEngine
from lit_rlhf.rollout.engines.packing import left_padded, pack_samples, requests_from_prompts
from lit_rlhf.rollout.experience import Experience
from lit_rlhf.rollout.metrics import mismatch_metrics, rollout_metrics, staleness_metrics, turn_metrics
from lit_rlhf.rollout.multi_turn.loop import TurnLoop, conversations, turn_bonus, turn_inputs
from lit_rlhf.seeds import rollout_seed, stream_seed
from lit_rlhf.settings import AlgorithmSettings, GenerationSettings, KLSettings, RolloutSettings


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


def scoring_groups(lengths: Tensor, rollout: RolloutSettings, reduce_max: AllReduce = no_reduce) -> list[Tensor]:
    """The rows of each scoring forward: similar lengths together; the same number of forwards on every rank."""
    size, tokens = rollout.score_micro_batch_size, rollout.score_micro_batch_tokens
    groups = length_groups(lengths, size, tokens)
    count = int(reduce_max(torch.tensor(len(groups), device=lengths.device)))
    return length_groups(lengths, size, tokens, count) if count != len(groups) else groups


def check_finite(rollout_id: int, loss_mask: Tensor, **tensors: Tensor) -> None:
    """Stop before training on non-finite log-probs or values (one host sync for all of them).

    Raises:
        FloatingPointError: naming the tensor and the rollout.
    """
    finite = torch.stack([torch.where(loss_mask, t, 0.0).isfinite().all() for t in tensors.values()])
    if not bool(finite.all()):
        name = next(n for n, ok in zip(tensors, finite.tolist(), strict=True) if not ok)
        raise FloatingPointError(
            f"rollout {rollout_id}: the {name} of the sampled responses are not finite, so the model that made "
            "them has non-finite weights (did training diverge?); nothing was trained on them"
        )


class RolloutRunner(AsynchronousRollouts):
    """Makes rollout ``k`` of one rank: a pure function of ``k``, the run's seed, the rank and the weights.

    Built by the module from its settings groups, its models, its engine and its reward scorer.
    ``collect`` is ``sample`` then ``score``; each can be called on its own.

    Args:
        models: the module's model set: the actor, its reference (none in a reference-free run) and
            the critic (none for the critic-free estimators).
        engine: what samples (started by the module before the first rollout).
        scorer: the sequence scores of a generation (a ``RewardScorer``).
        generation, rollout, algorithm, kl: the settings groups.
        kl_coef: the live KL coefficient (``.value``, read at each rollout: a ``KLController``).
        seed: the run's seed. rank: this process's rank.
        all_reduce, reduce_max: sum / maximum across ranks (identities in one process).
    """

    def __init__(
        self,
        models: PolicySet,
        engine: RolloutEngine,
        scorer: ScoreFn,
        *,
        generation: GenerationSettings,
        rollout: RolloutSettings,
        algorithm: AlgorithmSettings,
        kl: KLSettings,
        kl_coef: Any,
        seed: int = 0,
        rank: int = 0,
        all_reduce: AllReduce = no_reduce,
        reduce_max: AllReduce = no_reduce,
    ) -> None:
        self.models, self.engine, self.scorer = models, engine, scorer
        self.generation, self.rollout, self.algorithm, self.kl = generation, rollout, algorithm, kl
        self.kl_coef, self.seed, self.rank = kl_coef, seed, rank
        self.all_reduce, self.reduce_max = all_reduce, reduce_max
        self.turn_loop = None
        self._probe_prompt: tuple[int, ...] | None = None  # the weight check's fixed prompt (check_weights)
        self._rewards_per_turn = rollout.multi_turn is not None and rollout.multi_turn.turn_rewards == "last"
        if rollout.multi_turn is not None:  # tools and environments load once, at the start
            self.turn_loop = TurnLoop(rollout.multi_turn, engine, models.tokenizer, generation)
        self.carry_over: CarryOver | None = None
        if rollout.is_asynchronous and not getattr(engine, "generates_ahead", False):
            stops = None
            if generation.stop_strings:
                stops = StopStrings(models.tokenizer, generation.stop_strings).first_stop
            self.carry_over = CarryOver(
                rollout.asynchronous,
                rollout.rollout_batch_size,
                generation.n_samples_per_prompt,
                stream_seed(seed, rank),
                stops,
            )
        # the in-flight state before and after the latest asynchronous rollout (for checkpoints)
        self._async_states: dict | None = None
        # an engine that generates ahead: the rollouts submitted (or collected) ahead and their weights' versions
        self._ahead: list[dict] | None = None
        self._last_submit: float | None = None
        self._push_versions: dict[int, int] = {}  # an engine's push count -> the policy version it pushed

    PROBE_TOKENS = 16

    @torch.no_grad()
    def check_weights(self, prompts: dict) -> float:
        """After a weight push: the engine samples ``PROBE_TOKENS`` tokens after a fixed prompt (the
        first prompt of the first rollout on this rank, with a fixed seed; no top-k/top-p, so both sides
        read the same distribution) and the trainer scores them. Returns the mean |log-prob difference|
        (the largest over ranks); above ``rollout.weight_check_tolerance`` it raises, on every rank."""
        if self._probe_prompt is None:
            ids, mask = prompts["input_ids"][0], prompts["attention_mask"][0].bool()
            self._probe_prompt = tuple(ids[mask].tolist())
        settings = dataclasses.replace(
            self.generation, max_new_tokens=self.PROBE_TOKENS, top_k=0, top_p=1.0, stop_at_eos=False, stop_strings=()
        )
        request = GenerationRequest(self._probe_prompt, self.seed, (), self.PROBE_TOKENS)
        (sample,) = self.engine.generate([request], settings)
        actor = self.models.actor
        device = prompts["input_ids"].device
        sequence = torch.tensor([[*self._probe_prompt, *sample.token_ids]], device=device)
        with eval_mode(actor):
            mine = actor(sequence, torch.ones_like(sequence), len(sample.token_ids), settings.scoring_temperature)
        theirs = torch.tensor(sample.log_probs, device=device)
        diff = self.reduce_max((mine[0].float() - theirs).abs().mean())
        tolerance = self.rollout.weight_check_tolerance
        if not bool(torch.isfinite(diff)) or float(diff) > tolerance:
            raise RuntimeError(
                f"after the weight push, the rollout engine's log-probs of a fixed probe differ from the trainer's "
                f"by {float(diff):.4g} on average (> rollout.weight_check_tolerance {tolerance}): the engine is not "
                f"sampling with the trained weights (a weight push that did not load, or a stale engine: "
                f"{self.engine!r}). Stopped before training on its samples; raise the tolerance only if the "
                "engine's kernels really differ this much"
            )
        return float(diff)

    def collect(self, rollout_index: int, prompts: dict, progress: Progress = no_progress) -> Rollout:
        """Rollout ``rollout_index`` from this rank's prompts (what ``PromptDataModule.rollout_prompts``
        returns: left-padded ``input_ids``/``attention_mask`` ``[N, P]``, the rendered prompt texts
        ``prompts`` and the records' other fields ``columns``)."""
        return self.score(self.sample(rollout_index, prompts, progress), progress)

    @torch.no_grad()
    def sample(self, rollout_index: int, prompts: dict, progress: Progress = no_progress) -> Sampled:
        """Repeat each prompt ``generation.n_samples_per_prompt`` times (a prompt's samples stay
        contiguous, with its text and columns) and sample one response per row with the engine.

        Row ``i`` is seeded ``rollout_seed(seed, k, rank) + i``. The engine has the actor's weights
        (pushed before the rollout, or its own); an FSDP2-sharded actor sampling by itself is gathered
        once for the whole generation, not per token (``rollout.gather_for_generation``).
        """
        n, actor = self.generation.n_samples_per_prompt, self.models.actor
        input_ids = prompts["input_ids"].repeat_interleave(n, dim=0)
        attention_mask = prompts["attention_mask"].repeat_interleave(n, dim=0)
        first = rollout_seed(self.seed, rollout_index, self.rank)
        seeds = [first + i for i in range(len(input_ids))]
        texts = repeat_rows(prompts["prompts"], n)
        columns = {name: repeat_rows(values, n) for name, values in prompts["columns"].items()}
        on_token = lambda done, total: progress("generating", done, total)  # noqa: E731
        start = time.perf_counter()
        gather = self.rollout.gather_for_generation and self.engine.samples_with_actor
        trajectories = None
        with eval_mode(actor), gathered(actor.model, gather):
            if self.turn_loop is None:
                requests = requests_from_prompts(input_ids, attention_mask, seeds, self.generation.stop_token_ids)
                samples = self.engine.generate(requests, self.generation, on_token)
            else:
                trajectories = self.turn_loop.run(
                    *conversations(input_ids, attention_mask, texts, columns), seeds, on_token
                )
                samples = [t.sample for t in trajectories]
                prompt_ids = [t.trajectory.prompt_ids for t in trajectories]
                input_ids, attention_mask = left_padded(prompt_ids, actor.pad_token_id, input_ids.device)
        gen = pack_samples(input_ids, attention_mask, samples, actor.pad_token_id)
        return Sampled(rollout_index, gen, texts, columns, time.perf_counter() - start, trajectories)

    @torch.no_grad()
    def score(self, sampled: Sampled, progress: Progress = no_progress) -> Rollout:
        """Score forwards in micro-batches of rows of similar length: old log-probs (the sampler's,
        equal to a full forward's within float tolerance, unless ``rollout.recompute_old_log_probs``
        asks for a trainer forward), reference log-probs (reference model, or the actor with its
        adapter disabled; none in a reference-free run), values (critic, if any); then the sequence
        scores (the scorer), KL, token rewards, advantages and returns (``lit_rlhf.functional``).

        ``progress(phase, done, total)`` hears about each scoring forward.
        """
        models, gen, rollout_id = self.models, sampled.generation, sampled.rollout
        actor, critic, reference = models.actor, models.critic, models.reference
        temperature, num_actions = self.generation.scoring_temperature, gen.num_actions
        recompute = self.rollout.recomputes_old_log_probs
        start = time.perf_counter()
        with eval_mode(actor, critic, reference):
            micro = scoring_groups(gen.attention_mask.sum(-1), self.rollout, self.reduce_max)
            per_group = models.has_reference + recompute + (critic is not None)
            forwards = len(micro) * per_group + 1  # + the rewards
            done = [0]

            def tick() -> None:
                done[0] += 1
                progress("scoring", done[0], forwards)

            stale = self._stale_rows(sampled) if recompute else None
            if stale is not None:  # only rows with older tokens: the sampler's log-probs are the trainer's
                old_log_probs = gen.log_probs.clone()
                if len(stale):
                    groups = [stale[g] for g in scoring_groups(gen.attention_mask[stale].sum(-1), self.rollout)]
                    recomputed = in_micro_batches(lambda s, m: actor(s, m, num_actions, temperature), gen, groups)
                    old_log_probs[torch.cat(groups).sort().values] = recomputed
            elif recompute:
                old_log_probs = in_micro_batches(lambda s, m: actor(s, m, num_actions, temperature), gen, micro, tick)
            else:  # the sampler's own log-probs: the same weights and temperature, one forward pass fewer
                old_log_probs = gen.log_probs
            ref_log_probs = None
            if models.has_reference:
                ref_log_probs = in_micro_batches(
                    lambda s, m: models.reference_log_probs(s, m, num_actions, temperature), gen, micro, tick
                )
            if critic is not None:
                values = in_micro_batches(lambda s, m: critic(s, m, num_actions), gen, micro, tick)
            else:
                values = torch.zeros_like(old_log_probs)
            checked = {"old_log_probs": old_log_probs, "ref_log_probs": ref_log_probs, "values": values}
            check_finite(rollout_id, gen.loss_mask, **{k: v for k, v in checked.items() if v is not None})
            if sampled.trajectories is None:
                scores, reward_parts = self.scorer(gen, sampled.prompts, sampled.columns)
            else:  # the rewards see the final answer, the whole conversation and the environment's reward
                inputs = turn_inputs(sampled.trajectories, gen.sequences.device)
                scores, reward_parts = self.scorer(gen, sampled.prompts, sampled.columns, *inputs)
            tick()
        scoring_s = time.perf_counter() - start
        start = time.perf_counter()
        token_kl, rewards, advantages, returns = compute_advantages(
            scores,
            old_log_probs,
            ref_log_probs,
            values,
            gen.loss_mask,
            self.kl_coef.value,
            self.algorithm,
            self.kl,
            self.generation.n_samples_per_prompt,
            self.all_reduce,
            turn_bonus(sampled.trajectories, gen.loss_mask) if self._rewards_per_turn else None,
        )
        experience = Experience(
            sequences=gen.sequences,
            attention_mask=gen.attention_mask,
            loss_mask=gen.loss_mask,
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
            versions=sampled.versions
            if sampled.versions is not None
            else torch.full(gen.loss_mask.shape, rollout_id, dtype=torch.long, device=gen.loss_mask.device),
        )
        timing = {
            "generation_s": sampled.generation_s,
            "scoring_s": scoring_s,
            "advantages_s": time.perf_counter() - start,
            "generated_tokens": float(gen.loss_mask.sum()),
        }
        return Rollout(experience, reward_parts, timing, sampled.trajectories)

    def metrics(self, rollout: Rollout, carried: Carried | None = None) -> dict[str, Tensor]:
        """The rollout's reward, KL, length and EOS statistics over all ranks, with a recomputing
        engine the sampler-trainer mismatch (``rollout/logprob_abs_diff``, ``rollout/importance_ratio``),
        and for an asynchronous rollout its staleness and carried-over and dropped rows."""
        eos = self.models.actor.eos_token_ids
        group = self.generation.n_samples_per_prompt
        metrics = rollout_metrics(rollout.experience, rollout.reward_parts, eos, self.all_reduce, group)
        if self.rollout.recomputes_old_log_probs:
            metrics.update(mismatch_metrics(rollout.experience, self.all_reduce, self.reduce_max))
        if carried is not None:
            metrics.update(staleness_metrics(rollout.experience, carried.counts, self.all_reduce, self.reduce_max))
        if rollout.trajectories is not None:
            names = self.turn_loop.tool_names
            metrics.update(
                turn_metrics(rollout.experience, rollout.trajectories, self.all_reduce, self.reduce_max, names)
            )
        return metrics
