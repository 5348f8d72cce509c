"""The asynchronous rollouts of a ``RolloutRunner`` (``rollout.asynchronous``): partial rollouts with
carry-over over a colocated engine, or rollouts generated ahead by an engine of its own
(``SeparateEngine``), and the in-flight state either keeps for checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from lit_rlhf.models.sharding import gathered, is_sharded
from lit_rlhf.rollout.batches import Carried, Progress, PromptsAt, Rollout, Sampled, eval_mode, no_progress, repeat_rows
from lit_rlhf.rollout.carry_over import InFlight
from lit_rlhf.rollout.engines.base import GenerationRequest, Sample
from lit_rlhf.rollout.engines.packing import left_padded, pack_samples, requests_from_prompts
from lit_rlhf.seeds import rollout_seed


class AsynchronousRollouts:
    """``RolloutRunner``'s asynchronous rollouts (a mixin: it uses the runner's models, engine, settings,
    seed and rank, ``carry_over`` and ``score``)."""

    def collect_async(
        self, rollout_index: int, prompts_at: PromptsAt, progress: Progress = no_progress
    ) -> tuple[Rollout, Carried]:
        """An asynchronous rollout (``rollout.asynchronous``): ``sample_async`` then ``score``."""
        sampled = self.sample_async(rollout_index, prompts_at, progress)
        return self.score(sampled, progress), Carried(sampled.carry, sampled.prompt_batch)

    @torch.no_grad()
    def sample_async(self, rollout_index: int, prompts_at: PromptsAt, progress: Progress = no_progress) -> Sampled:
        """Decode the groups in flight and new ones from this rank's prompt stream (``prompts_at(positions)``:
        a ``PromptDataModule.stream_prompts`` batch) until ``rollout_batch_size`` groups are complete
        (``lit_rlhf.rollout.carry_over``); the trained groups' rows come back packed, a prompt's samples
        contiguous, with every token's policy version. Unfinished rows stay in flight."""
        carry, actor = self.carry_over, self.models.actor
        if carry is None:
            raise RuntimeError("sample_async needs rollout.asynchronous with max_staleness > 0")
        self._restore_in_flight(rollout_index)
        before = carry.state.state_dict()

        def prompt_ids(positions: list[int]) -> list[list[int]]:
            batch = prompts_at(positions)
            rows = zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(-1).tolist(), strict=True)
            return [ids[len(ids) - n :] for ids, n in rows]

        on_token = lambda done, total: progress("generating", done, total)  # noqa: E731
        start = time.perf_counter()
        gather = self.rollout.gather_for_generation and self.engine.samples_with_actor
        with eval_mode(actor), gathered(actor.model, gather):
            outcome = carry.run(rollout_index, self.engine, self.generation, prompt_ids, on_token)
        generation_s = time.perf_counter() - start
        self._async_states = {"rollout": rollout_index, "before": before, "after": carry.state.state_dict()}
        n, device = self.generation.n_samples_per_prompt, self._device()
        batch = prompts_at([group.position for group in outcome.trained], count=False)
        rows = [row for group in outcome.trained for row in group.rows]
        input_ids, attention_mask = left_padded([row.prompt_ids for row in rows], actor.pad_token_id, device)
        gen = pack_samples(input_ids, attention_mask, [row.sample() for row in rows], actor.pad_token_id)
        versions = torch.full(gen.loss_mask.shape, rollout_index, dtype=torch.long)
        for i, row in enumerate(rows):
            versions[i, : len(row.versions)] = torch.tensor(row.versions, dtype=torch.long)
        texts = repeat_rows(batch["prompts"], n)
        columns = {name: repeat_rows(values, n) for name, values in batch["columns"].items()}
        counts = {
            "dropped_rows": float(outcome.dropped_rows),
            "carried_over_rows": float(outcome.carried_rows),
            "decode_steps": float(outcome.decode_steps),
        }
        return Sampled(rollout_index, gen, texts, columns, generation_s, None, versions.to(device), counts, batch)

    @torch.no_grad()
    def collect_ahead(
        self,
        rollout_index: int,
        prompts_of: Callable[[int], dict],
        push: Callable[[], None],
        progress: Progress = no_progress,
    ) -> tuple[Rollout, Carried]:
        """Rollouts generated ahead by an engine of its own (``SeparateEngine``), η =
        ``asynchronous.max_staleness`` of them: rollout ``k``'s samples were submitted during rollout
        ``k - η`` (or later) with the weights pushed then; they are collected, the current weights are
        pushed (``push``: the push and its weight check), and the rollouts up to ``k + η`` are submitted
        before rollout ``k`` is scored, so the engine generates while the trainer scores and trains.
        ``prompts_of(j)``: this rank's prompts of rollout ``j``. The first rollout (and one after a resume
        without its samples) is generated after the push, with version ``k``."""
        engine, ahead = self.engine, self._ahead
        start = time.perf_counter()
        pushed = False
        if ahead and ahead[0]["rollout"] == rollout_index:
            entry = ahead.pop(0)
            if "samples" in entry:  # collected already (a checkpoint was written meanwhile)
                samples, generation_s = [Sample(*s) for s in entry["samples"]], entry["generation_s"]
                versions = entry.get("versions")
            else:
                samples, versions, generation_s = self._collected()
            versions = versions or [[entry["version"]] * len(s.token_ids) for s in samples]
        else:
            if ahead:
                raise RuntimeError(
                    f"rollout {rollout_index}: the rollouts generated ahead start at {ahead[0]['rollout']}"
                )
            self._push(push, rollout_index)
            pushed = True
            engine.submit(self._requests(rollout_index, prompts_of(rollout_index)), self.generation)
            samples, versions, generation_s = self._collected()
        waited = time.perf_counter() - start
        if not pushed:  # a generation still in flight pauses for it (SeparateEngine.pause_for_push)
            self._push(push, rollout_index)
        now = time.perf_counter()
        generator_idle = 0.0
        if self._last_submit is not None and not pushed:
            generator_idle = max(0.0, now - self._last_submit - generation_s)
        ahead = list(ahead or [])
        last = ahead[-1]["rollout"] if ahead else rollout_index
        for j in range(last + 1, rollout_index + self.rollout.asynchronous.max_staleness + 1):
            engine.submit(self._requests(j, prompts_of(j)), self.generation)
            ahead.append({"rollout": j, "version": rollout_index})
        self._ahead, self._last_submit = ahead, now
        prompts = prompts_of(rollout_index)
        n, actor = self.generation.n_samples_per_prompt, self.models.actor
        input_ids = prompts["input_ids"].repeat_interleave(n, dim=0)
        attention_mask = prompts["attention_mask"].repeat_interleave(n, dim=0)
        gen = pack_samples(input_ids, attention_mask, samples, actor.pad_token_id)
        versions_of = torch.full(gen.loss_mask.shape, rollout_index, dtype=torch.long)
        for i, row in enumerate(versions):
            versions_of[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        texts = repeat_rows(prompts["prompts"], n)
        columns = {name: repeat_rows(values, n) for name, values in prompts["columns"].items()}
        counts = {
            "dropped_rows": 0.0,
            "carried_over_rows": 0.0,
            "trainer_idle_s": generation_s if pushed else waited,
            "generator_idle_s": generator_idle,
        }
        versions_of = versions_of.to(gen.loss_mask.device)
        sampled = Sampled(rollout_index, gen, texts, columns, generation_s, None, versions_of, counts, prompts)
        return self.score(sampled, progress), Carried(counts, prompts)

    def _push(self, push: Callable[[], None], rollout_index: int) -> None:
        """Push the weights of rollout ``rollout_index`` (the engine counts its pushes: the tokens it samples
        from now on carry that count, which stands for this version)."""
        push()
        self._push_versions[self.engine.pushes] = rollout_index

    def _collected(self) -> tuple[list[Sample], list[list[int]], float]:
        """The engine's oldest generation: its samples, each token's policy version, its seconds."""
        samples, pushes, generation_s = self.engine.collect()
        return samples, [[self._push_versions[p] for p in row] for row in pushes], generation_s

    def _requests(self, rollout_index: int, prompts: dict) -> list[GenerationRequest]:
        """One request per sample of ``prompts`` for rollout ``rollout_index``, seeded as ``sample`` seeds them."""
        n = self.generation.n_samples_per_prompt
        input_ids = prompts["input_ids"].repeat_interleave(n, dim=0)
        attention_mask = prompts["attention_mask"].repeat_interleave(n, dim=0)
        first = rollout_seed(self.seed, rollout_index, self.rank)
        seeds = [first + i for i in range(len(input_ids))]
        return requests_from_prompts(input_ids, attention_mask, seeds, self.generation.stop_token_ids)

    def in_flight_state(self) -> dict | None:
        """The asynchronous rollouts' state for a checkpoint: the rows in flight before and after the latest
        rollout, or with an engine that generates ahead the next rollout's samples (collected now, kept
        for that rollout); plain numbers and lists; None in a synchronous run."""
        if self._ahead is not None:
            for i, entry in enumerate(self._ahead):  # in submission order, as the engine returns them
                if "samples" not in entry:
                    samples, versions, generation_s = self._collected()
                    kept = [(s.token_ids, s.log_probs, s.finish_reason, s.loss_mask) for s in samples]
                    self._ahead[i] = {**entry, "samples": kept, "versions": versions, "generation_s": generation_s}
            return {"ahead": self._ahead}
        if self.carry_over is None:
            return None
        if self._async_states is None:
            state = self.carry_over.state.state_dict()
            return {"rollout": -1, "before": state, "after": state}
        return self._async_states

    def load_in_flight_state(self, state: dict | None) -> None:
        """Restore :meth:`in_flight_state` (from a checkpoint); the next rollout picks the state it starts from."""
        if state is not None and "ahead" in state:
            self._ahead = list(state["ahead"])
        elif self.carry_over is not None and state is not None:
            self._async_states = {**state, "pending": True}

    def _restore_in_flight(self, rollout_index: int) -> None:
        """After a resume: rollout ``k`` reruns from the state before it, rollout ``k + 1`` goes on from
        the one after."""
        states = self._async_states
        if states is None or not states.get("pending"):
            return
        self._async_states = {key: value for key, value in states.items() if key != "pending"}
        if rollout_index == states["rollout"]:
            self.carry_over.state = InFlight.from_state(states["before"])
        elif rollout_index == states["rollout"] + 1:
            self.carry_over.state = InFlight.from_state(states["after"])
        else:
            raise RuntimeError(
                f"the checkpoint's in-flight rows are those of rollout {states['rollout']}, but the run resumes at "
                f"rollout {rollout_index}: resume from the checkpoint written with them"
            )

    def _stale_rows(self, sampled: Sampled) -> Tensor | None:
        """The rows of an asynchronous rollout whose old log-probs need a trainer forward (those with a
        token of an older policy), or None for all of them. Only where the engine's own log-probs are the
        trainer's (the native sampler, unless ``rollout.recompute_old_log_probs`` asks for all) and the
        actor is not sharded (every rank then runs the same forwards)."""
        if sampled.versions is None or self.rollout.recompute_old_log_probs is not None:
            return None
        if self.engine.recomputes_old_log_probs or is_sharded(self.models.actor.model):
            return None
        older = (sampled.versions < sampled.rollout) & sampled.generation.loss_mask
        return older.any(-1).nonzero().squeeze(1)

    def _device(self) -> torch.device:
        return self.models.actor.eos_token_ids.device
