"""Reward components: weighted sums, dataset columns, async concurrency, overrides, and bad rewards."""

import asyncio
import threading
import time

import lightning as L
import pytest
import torch

from lit_rlhf import PPOModule
from lit_rlhf.models import GenerationOutput
from lit_rlhf.rewards import RewardBatch, RewardError, RewardFunction, RewardModel, score_components
from lit_rlhf.rewards.base import as_components
from lit_rlhf.rewards.deadline import LOOP_GRACE_S
from lit_rlhf.rewards.model import append_eos
from tests.helpers import datamodule, small_module, trainer

ANSWER_SEEN: list = []


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def answer_match(prompts, responses, answer):
    ANSWER_SEEN.append(list(answer))
    return torch.tensor([float(r.strip() == str(a)) for r, a in zip(responses, answer, strict=True)])


def fit(tmp_path, module, epochs=1):
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, epochs)
    t.fit(module, datamodule=datamodule(module.assets))
    return t


def make(tiny_assets, **groups):
    module = small_module(tiny_assets, PPOModule, **groups)
    module.assets = tiny_assets
    return module


def texts(module):
    """The rollout's prompts (repeated per sample) and decoded responses."""
    exp = module.buffer.experience
    responses = module.decode_responses(
        GenerationOutput(exp.sequences, exp.attention_mask, exp.loss_mask, exp.old_log_probs, exp.scores > 0)
    )
    return responses


def test_python_api_callable_gets_the_answer_column_repeated_for_each_sample(tiny_assets, tmp_path):
    ANSWER_SEEN.clear()
    module = make(
        tiny_assets,
        rewards=[RewardFunction(answer_match), RewardFunction(length_reward, weight=0.5)],
        generation={"n_samples_per_prompt": 2},
        rollout={"rollout_batch_size": 8},
    )
    t = fit(tmp_path, module)
    answers = ANSWER_SEEN[0]
    assert len(answers) == 16 and answers[0::2] == answers[1::2], "each prompt's answer, once per sample"
    responses = texts(module)
    expected = answer_match([], responses, answers) + 0.5 * torch.tensor(length_reward([], responses))
    torch.testing.assert_close(module.buffer.experience.scores, expected)
    import pandas as pd

    logged = pd.read_csv(f"{t.logger.log_dir}/metrics.csv").dropna(subset=["reward/score"]).iloc[0]
    assert logged["reward/length_reward"] == pytest.approx(sum(map(len, responses)) / 16, rel=1e-5)
    assert logged["reward/score"] == pytest.approx(
        logged["reward/answer_match"] + 0.5 * logged["reward/length_reward"], rel=1e-5
    )


def test_columns_go_only_to_functions_that_accept_them():
    seen = {}

    def named(prompts, responses, answer):
        seen["named"] = answer
        return [0.0] * len(prompts)

    def kwargs(prompts, responses, **columns):
        seen["kwargs"] = columns
        return [0.0] * len(prompts)

    def plain(prompts, responses):
        return [1.0] * len(prompts)

    batch = RewardBatch(["a", "b"], ["x", "y"], {"answer": ["1", "2"], "source": ["s", "t"]})
    components = [RewardFunction(named), RewardFunction(kwargs), RewardFunction(plain)]
    scores = score_components(components, batch)
    assert seen == {"named": ["1", "2"], "kwargs": {"answer": ["1", "2"], "source": ["s", "t"]}}
    assert scores["plain"].tolist() == [1.0, 1.0]


def test_async_rewards_are_awaited_concurrently():
    """The first reward waits for an event only the second one sets: run one after the other, it times out."""
    state = {}

    async def waits(prompts, responses):
        state.setdefault("event", asyncio.Event())
        await asyncio.wait_for(state["event"].wait(), timeout=5)
        return [1.0] * len(prompts)

    async def sets(prompts, responses):
        state.setdefault("event", asyncio.Event())
        await asyncio.sleep(0.05)
        state["event"].set()
        return [2.0] * len(prompts)

    batch = RewardBatch(["a"], ["x"])
    scores = score_components([RewardFunction(waits), RewardFunction(sets)], batch)
    assert scores["waits"].tolist() == [1.0] and scores["sets"].tolist() == [2.0]


def bad(value):
    def reward(prompts, responses):
        return value

    return reward


@pytest.mark.parametrize(
    "value,message",
    [
        (None, "reward bad returned NoneType; it must return one float per response"),
        (["0.5", "1"], "reward bad returned '0.5' \\(str\\) for sample 0 \\(prompt 'p0', response 'r0'\\)"),
        ([0.5, None], "reward bad returned None \\(NoneType\\) for sample 1 \\(prompt 'p1', response 'r1'\\)"),
        ("1.0", "reward bad returned str"),
        ([0.5, float("nan")], "reward bad returned nan for sample 1 \\(prompt 'p1', response 'r1'\\)"),
        (torch.tensor([float("inf"), 0.0]), "reward bad returned inf for sample 0"),
        (torch.zeros(3), "reward bad returned shape \\(3,\\); expected \\(2,\\)"),
        ([1.0], "reward bad returned shape \\(1,\\); expected \\(2,\\)"),
    ],
)
def test_a_bad_reward_is_named_with_the_sample(value, message):
    batch = RewardBatch(["p0", "p1"], ["r0", "r1"])
    with pytest.raises(RewardError, match=message):
        score_components([RewardFunction(bad(value), name="bad")], batch)


def test_a_raising_reward_is_named():
    def broken(prompts, responses):
        raise ConnectionError("sandbox down")

    async def broken_async(prompts, responses):
        raise TimeoutError("judge timed out")

    batch = RewardBatch(["p"], ["r"])
    with pytest.raises(RewardError, match="reward broken raised ConnectionError: sandbox down"):
        score_components([RewardFunction(broken)], batch)
    with pytest.raises(RewardError, match="reward broken_async raised TimeoutError: judge timed out"):
        score_components([RewardFunction(broken_async)], batch)


def test_reward_model_text_path_equals_the_token_path(tiny_assets):
    """Re-tokenised text and the actor's token ids give the same scores, finished or cut responses alike."""
    from lit_rlhf.models import load_tokenizer
    from lit_rlhf.settings import LoadSettings

    tok = load_tokenizer(tiny_assets["policy"])
    component = RewardModel(tiny_assets["reward"])
    component.ensure_setup(tok, LoadSettings())
    assert component.shares_tokenizer
    prompts = ["<bos>12+34=", "<bos>7+1="]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    responses = torch.tensor([[5, 6, tok.eos_token_id, 0], [5, 6, 7, 8]])  # the second was cut
    loss_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    sequences = torch.cat([enc.input_ids, responses], 1)
    attention_mask = torch.cat([enc.attention_mask, loss_mask.long()], 1)
    decoded = tok.batch_decode(responses.masked_fill(~loss_mask, tok.pad_token_id), skip_special_tokens=True)
    token_path = component.score(RewardBatch(prompts, decoded, {}, sequences, attention_mask))
    text_path = component.score(RewardBatch(prompts, decoded))
    torch.testing.assert_close(token_path, text_path, atol=1e-5, rtol=1e-5)
    # the cut response is scored with an EOS appended: equal to scoring it finished by hand
    finished = torch.cat([sequences[1:], torch.tensor([[tok.eos_token_id]])], 1)
    by_hand = component.model.score(finished, torch.cat([attention_mask[1:], torch.ones(1, 1, dtype=torch.long)], 1))
    torch.testing.assert_close(token_path[1:], by_hand, atol=1e-5, rtol=1e-5)


def test_append_eos_adds_one_only_where_missing():
    sequences = torch.tensor([[0, 1, 5, 2, 0], [1, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    out, out_mask = append_eos(sequences, mask, torch.tensor([2]))
    assert out.tolist() == [[0, 1, 5, 2, 0, 0], [1, 5, 6, 7, 8, 2]]
    assert out_mask.tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


class Bonus(PPOModule):
    """An override that adds to the components' weighted sum and reads a column."""

    def compute_reward(self, prompts, responses, answer):
        return super().compute_reward(prompts, responses, answer=answer) + 10.0


class Replacing(PPOModule):
    """An override that never calls the components: the configured reward model is never loaded."""

    def compute_reward(self, prompts, responses):
        return torch.ones(len(prompts))


def test_an_override_can_add_to_the_components_and_unused_ones_are_not_loaded(tiny_assets, tmp_path):
    ANSWER_SEEN.clear()
    bonus = small_module(tiny_assets, Bonus, rewards=[RewardFunction(answer_match)])
    bonus.assets = tiny_assets
    fit(tmp_path / "bonus", bonus)
    expected = answer_match([], texts(bonus), ANSWER_SEEN[0]) + 10.0
    torch.testing.assert_close(bonus.buffer.experience.scores, expected)
    replacing = small_module(tiny_assets, Replacing, rewards=[RewardModel(tiny_assets["reward"])])
    replacing.assets = tiny_assets
    fit(tmp_path / "replacing", replacing)
    assert torch.equal(replacing.buffer.experience.scores, torch.ones(16))
    assert replacing.rewards[0].model is None, "a component the override never calls is not loaded"


def test_component_names_are_unique_and_configs_rebuild_them(tiny_assets):
    with pytest.raises(ValueError, match="two reward components are named \\['length_reward'\\]"):
        make(tiny_assets, rewards=[RewardFunction(length_reward), RewardFunction(length_reward)])
    with pytest.raises(ValueError, match="reward name 'score'"):
        RewardFunction(length_reward, name="score")
    with pytest.raises(TypeError, match="rewards\\[0\\] is <function length_reward"):
        make(tiny_assets, rewards=[length_reward])
    components = [RewardFunction("tests.rewards.test_components.length_reward", weight=0.5), RewardModel("some/rm")]
    rebuilt = as_components([c.to_config() for c in components])
    assert [c.to_config() for c in rebuilt] == [c.to_config() for c in components]
    assert rebuilt[0].weight == 0.5 and rebuilt[1].path == "some/rm"


def test_checkpoint_settings_load_without_pickled_code(tiny_assets, tmp_path):
    """A Python-built module's checkpoint holds plain settings: it loads with weights_only=True and rebuilds."""
    module = make(tiny_assets, rewards=[RewardFunction("tests.rewards.test_components.length_reward")])
    t = fit(tmp_path, module)
    t.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    settings = checkpoint["hyper_parameters"]
    assert settings["rewards"][0]["init_args"]["fn"] == "tests.rewards.test_components.length_reward"
    rebuilt = PPOModule(**settings)
    assert rebuilt.generation == module.generation and rebuilt.algorithm == module.algorithm
    assert rebuilt.rewards[0].fn([""], ["abc"]) == [3.0]


# --- deadlines ------------------------------------------------------------------------------------


def test_an_async_reward_that_never_returns_stops_within_its_timeout():
    async def never_returns(prompts, responses):
        await asyncio.Event().wait()  # nobody sets it

    start = time.monotonic()
    with pytest.raises(
        RewardError, match="reward never_returns gave no scores within its timeout_s=0.5 s; .*raise timeout_s"
    ):
        score_components([RewardFunction(never_returns, timeout_s=0.5)], RewardBatch(["p"], ["r"]))
    assert time.monotonic() - start < 2.0


def test_a_hanging_sync_reward_and_an_async_one_that_blocks_its_loop_stop_too():
    release = threading.Event()  # set at the end, so the abandoned threads finish

    def hangs(prompts, responses):
        release.wait()
        return [0.0] * len(prompts)

    async def blocks(prompts, responses):
        release.wait()  # a blocking call inside async def: the event loop itself is stuck
        return [0.0] * len(prompts)

    batch = RewardBatch(["p"], ["r"])
    try:
        start = time.monotonic()
        with pytest.raises(RewardError, match="reward hangs gave no scores within its timeout_s=0.5 s"):
            score_components([RewardFunction(hangs, timeout_s=0.5)], batch)
        assert time.monotonic() - start < 2.0
        start = time.monotonic()
        with pytest.raises(RewardError, match="reward blocks gave no scores within its timeout_s=0.5 s .*blocked"):
            score_components([RewardFunction(blocks, timeout_s=0.5)], batch)
        assert time.monotonic() - start < 0.5 + LOOP_GRACE_S + 1.0
    finally:
        release.set()


def test_a_sync_reward_runs_on_a_helper_thread_with_the_callers_grad_mode():
    seen = {}

    def records(prompts, responses):
        seen.update(thread=threading.current_thread().name, grad=torch.is_grad_enabled())
        return [1.0] * len(prompts)

    with torch.no_grad():
        scores = score_components([RewardFunction(records)], RewardBatch(["p"], ["r"]))["records"]
    assert scores.tolist() == [1.0] and seen == {"thread": "reward records", "grad": False}


def test_timeout_s_is_checked_and_travels_in_the_config(tiny_assets):
    with pytest.raises(ValueError, match="reward timeout_s must be a finite number of seconds > 0, got 0"):
        RewardFunction(length_reward, timeout_s=0)
    components = [RewardFunction(length_reward, timeout_s=7.5), RewardModel("some/rm", timeout_s=30)]
    rebuilt = as_components([c.to_config() for c in components])
    assert [c.timeout_s for c in rebuilt] == [7.5, 30.0]
    assert RewardFunction(length_reward).timeout_s == RewardModel("some/rm").timeout_s == 300.0


# --- isolation and reward-model statistics ---------------------------------------------------------


def test_one_components_in_place_edits_reach_no_other_component():
    seen = []

    def vandal(prompts, responses, answer):
        responses[0] = "edited"
        answer[0] = "edited"
        prompts.clear()
        return [0.0, 0.0]

    def reader(prompts, responses, answer):
        seen.append((list(prompts), list(responses), list(answer)))
        return [1.0, 1.0]

    batch = RewardBatch(["p0", "p1"], ["r0", "r1"], {"answer": ["a0", "a1"]})
    score_components([RewardFunction(vandal), RewardFunction(reader), RewardFunction(vandal, name="again")], batch)
    assert seen == [(["p0", "p1"], ["r0", "r1"], ["a0", "a1"])]
    assert (batch.prompts, batch.responses, batch.columns) == (["p0", "p1"], ["r0", "r1"], {"answer": ["a0", "a1"]})


def test_normalize_needs_the_statistics_a_reward_model_stage_stores(tiny_assets, tmp_path):
    import json
    import shutil

    from lit_rlhf.models import load_tokenizer
    from lit_rlhf.settings import LoadSettings

    tok = load_tokenizer(tiny_assets["policy"])
    bare = str(tmp_path / "bare_rm")
    shutil.copytree(tiny_assets["reward"], bare)  # saved by transformers alone: no reward_mean/std
    with pytest.raises(ValueError, match=f"normalize=true\\): '{bare}' stores no reward mean/std.*RewardModelModule"):
        RewardModel(bare, normalize=True).ensure_setup(tok, LoadSettings())
    RewardModel(bare).ensure_setup(tok, LoadSettings())  # without normalize it loads
    config = json.loads((tmp_path / "bare_rm" / "config.json").read_text())
    (tmp_path / "bare_rm" / "config.json").write_text(json.dumps({**config, "reward_mean": 0.5, "reward_std": 2.0}))
    stored = RewardModel(bare, normalize=True)
    stored.ensure_setup(tok, LoadSettings())
    raw = RewardModel(bare)
    raw.ensure_setup(tok, LoadSettings())
    batch = RewardBatch(["<bos>12+34="], ["46"])
    torch.testing.assert_close(stored.score(batch), (raw.score(batch) - 0.5) / 2.0)


def huge_reward(prompts, responses):
    return [500.0 + len(r) for r in responses]


@pytest.mark.parametrize("clip", [None, 5.0])
def test_scores_large_enough_to_swamp_the_critic_are_warned_once_unless_clipped(tiny_assets, tmp_path, caplog, clip):
    module = make(
        tiny_assets,
        rewards=[RewardFunction(huge_reward)],
        algorithm={"reward_clip": clip},
        rollout={"rollout_batch_size": 8},
    )
    with caplog.at_level("WARNING", logger="lit_rlhf.rewards.base"):
        fit(tmp_path, module, epochs=2)
    warned = [r for r in caplog.records if "in magnitude" in r.getMessage()]
    if clip is None:
        assert len(warned) == 1 and "algorithm.reward_clip" in warned[0].getMessage()
        assert module.buffer.experience.scores.min() >= 500.0
    else:
        assert warned == [] and module.buffer.experience.scores.max() == pytest.approx(clip)
