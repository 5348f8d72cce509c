"""What engines keep between calls: the native engine's prefix cache across turns and shared prompts,
and a sleeping vLLM engine's wake-ups."""

import contextlib
import types

import pytest

from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.rollout import NativeEngine, VLLMEngine
from lit_rlhf.rollout.carry_over import CarryOver
from lit_rlhf.rollout.engines.base import GenerationRequest
from lit_rlhf.settings import AsyncSettings, GenerationSettings


def test_the_native_prefix_cache_prefills_only_new_tokens_and_samples_what_a_full_prefill_samples(tiny_assets):
    """Inside ``prefix_cache()``: a shared prompt prefix is prefilled once, a request that continues a
    row of the last call prefills only its new tokens, and the tokens are those of an engine without it."""
    tok = load_tokenizer(tiny_assets["policy"])
    actor = Actor.from_pretrained(tiny_assets["policy"], tok)
    ids = lambda text: tuple(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    shared, stop = ids("12+34=46 5+5=10 77+1=78 9+9=18 30+3=33 "), ids("=")
    assert len(shared) >= NativeEngine.shared_prefix_min
    requests = [GenerationRequest(shared + ids(t), 11 + i, stop) for i, t in enumerate(["1+2=", "40+", "3+", "99+1"])]
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0)
    cached, plain = NativeEngine(), NativeEngine()
    cached.start(actor, "cpu"), plain.start(actor, "cpu")
    prefilled = []  # (tokens prefilled, tokens already cached) per call
    generate = actor.generate

    def spy(input_ids, *args, prefix=None, **kwargs):
        prefilled.append((input_ids.shape[1], 0 if prefix is None else prefix.mask.shape[1]))
        return generate(input_ids, *args, prefix=prefix, **kwargs)

    actor.generate = spy
    with cached.prefix_cache():
        first, again = cached.generate(requests, settings), plain.generate(requests, settings)
        longest = max(len(r.prompt_ids) for r in requests)
        assert prefilled == [(longest - len(shared), len(shared)), (longest, 0)]
        assert [s.finish_reason for s in first].count("stop") >= 2
        observation = ids(" 5+6=")
        continued = [
            GenerationRequest(r.prompt_ids + s.token_ids + observation, r.seed + 1, stop)
            for r, s in zip(requests, first, strict=True)
            if s.finish_reason == "stop"
        ]
        second, second_plain = cached.generate(continued, settings), plain.generate(continued, settings)
    # the second call prefills each row's last sampled token and the observation, nothing before them
    assert prefilled[2] == (1 + len(observation), max(len(r.prompt_ids) for r in continued) - 1 - len(observation))
    assert cached._kept is None, "the kept keys and values are freed with the context"
    for mine, theirs in zip(first + second, again + second_plain, strict=True):
        assert mine.token_ids == theirs.token_ids and mine.finish_reason == theirs.finish_reason
        assert mine.log_probs == pytest.approx(theirs.log_probs, abs=1e-5)


class SleepyLLM:
    """Stands in for ``vllm.LLM`` with sleep mode: records the calls, refuses to generate while asleep."""

    def __init__(self):
        self.calls, self.asleep = [], False
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=64))

    def sleep(self, level):
        self.calls.append("sleep")
        self.asleep = True

    def wake_up(self):
        self.calls.append("wake_up")
        self.asleep = False

    def generate(self, prompts, params, use_tqdm=False):
        assert not self.asleep, "generate on a sleeping engine: its weights are released"
        self.calls.append("generate")
        out = types.SimpleNamespace(
            token_ids=[5, 2],
            logprobs=[{5: types.SimpleNamespace(logprob=-0.1)}, {2: types.SimpleNamespace(logprob=-0.2)}],
            finish_reason="stop",
        )
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


def test_a_sleeping_vllm_engine_wakes_for_every_generation_and_stays_awake_across_turns(monkeypatch):
    engine = VLLMEngine()
    engine.llm, engine.enable_sleep_mode, engine.eos_token_ids = SleepyLLM(), True, [2]
    monkeypatch.setattr(engine, "sampling_params", lambda *args: None)
    engine._sleep()  # as start() leaves it
    request, settings = [GenerationRequest((1, 3), 0)], GenerationSettings(max_new_tokens=4)
    assert engine.generate(request, settings)[0].token_ids == (5, 2)
    engine.generate(request, settings)  # a second call (the rollout after the weight check) wakes it again
    assert engine.llm.calls == ["sleep", "wake_up", "generate", "sleep", "wake_up", "generate", "sleep"]
    engine.llm.calls.clear()
    with engine.prefix_cache():  # a multi-turn rollout: awake for all its turns, asleep after
        engine.generate(request, settings)
        engine.generate(request, settings)
    assert engine.llm.calls == ["wake_up", "generate", "generate", "sleep"]


class NoPrefixCache(NativeEngine):
    """The native engine with its prefix cache turned off: every call prefills every prompt."""

    def prefix_cache(self):
        return contextlib.nullcontext()


def test_native_rows_stopped_at_a_segment_resume_from_their_kept_keys_and_values(tiny_assets):
    """An asynchronous rollout's segments: each continued row prefills only its last sampled token, and
    the rows sample exactly what an engine that prefills everything again samples."""
    tok = load_tokenizer(tiny_assets["policy"])
    actor = Actor.from_pretrained(tiny_assets["policy"], tok)
    prompt = [tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in ("12+34=", "5+5=", "77+1=", "9+")]
    settings = AsyncSettings(max_staleness=1, over_provision=0, segment_tokens=3)
    generation = GenerationSettings(
        max_new_tokens=12, n_samples_per_prompt=2, suppress_token_ids=(tok.eos_token_id,)
    )  # no EOS: every row runs 12 tokens, 4 segments
    prefilled, generate = [], actor.generate

    def spy(input_ids, *args, prefix=None, **kwargs):
        prefilled.append((input_ids.shape[1], 0 if prefix is None else prefix.mask.shape[1]))
        return generate(input_ids, *args, prefix=prefix, **kwargs)

    actor.generate = spy
    outcomes = []
    for engine in (NativeEngine(), NoPrefixCache()):
        engine.start(actor, "cpu")
        carry = CarryOver(settings, rollout_batch_size=4, n_samples=2, base_seed=7)
        outcomes.append(carry.run(0, engine, generation, lambda positions: [list(prompt[p]) for p in positions]))
    cached, plain = outcomes
    calls = len(prefilled) // 2
    assert calls == 4  # 12 tokens in segments of 3
    assert all(width == 1 and held > 0 for width, held in prefilled[1:calls]), prefilled
    assert all(held == 0 for _, held in prefilled[calls:])
    for a, b in zip(cached.trained, plain.trained, strict=True):
        for x, y in zip(a.rows, b.rows, strict=True):
            assert x.token_ids == y.token_ids and len(x.token_ids) == 12
            assert x.log_probs == pytest.approx(y.log_probs, abs=1e-5)
