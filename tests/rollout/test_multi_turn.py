"""Multi-turn rollouts through the runner: a scripted engine's turns, the tools' answers as untrained
observation tokens, counts, rewards on the final answer, limits, and one turn equal to the single-turn rollout."""

import pytest
import torch

from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.rewards import RewardFunction
from lit_rlhf.rewards.scorer import RewardScorer
from lit_rlhf.rollout import NativeEngine, Sample
from lit_rlhf.rollout.kl_control import KLController
from lit_rlhf.rollout.multi_turn.environment import Environment, Step
from lit_rlhf.rollout.multi_turn.tokens import TemplateError, check_renders_tools
from lit_rlhf.rollout.multi_turn.tools import tool_schema
from lit_rlhf.rollout.runner import RolloutRunner
from lit_rlhf.settings import AlgorithmSettings, GenerationSettings, KLSettings, LoadSettings, RolloutSettings
from lit_rlhf.tasks import chat_tokenizer
from tests.rollout.scripted import SCRIPT, ScriptedEngine, batch, calculator, call, runner


def test_tools_answer_between_turns_and_only_the_policys_tokens_are_trained_on(kit):
    tok, paths = kit
    engine = ScriptedEngine(tok)
    run = runner(tok, paths, engine, {"tools": [calculator], "max_turns": 3})
    rollout = run.collect(0, batch(tok))
    exp, trajectories = rollout.experience, rollout.trajectories
    assert engine.calls == [4, 3]  # turn 2 only for the rows that called a tool
    assert [t.trajectory.turns for t in trajectories] == [2, 2, 1, 2]
    assert [sum(t.tool_calls.values()) for t in trajectories] == [1, 1, 0, 1]
    assert [sum(t.tool_errors.values()) for t in trajectories] == [0, 1, 0, 1]
    tool_texts = [m["content"] for t in trajectories for m in t.completion if m["role"] == "tool"]
    assert tool_texts[0] == "5535" and "wrong arguments" in tool_texts[1] and "not valid JSON" in tool_texts[2]
    width = exp.num_actions
    for row, t in enumerate(trajectories):
        ids = exp.sequences[row, -width:].tolist()
        mask = exp.loss_mask[row].tolist()
        trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
        assert "tool_response" not in trained and "error" not in trained  # no tool text is trained on
        for turn in SCRIPT[row][: t.trajectory.turns]:  # every sampled turn, verbatim and in order
            assert turn in trained
        assert exp.attention_mask[row, -width:].sum() >= exp.loss_mask[row].sum()
    # the reward saw the final answer: every scripted row ends right
    assert exp.scores.tolist() == [1.0, 1.0, 1.0, 1.0]
    # returns (reinforce_pp, gamma 1) reach back over the observation to the first turn's tokens
    first = exp.loss_mask[0].nonzero()[0].item()
    assert exp.returns[0, first] == pytest.approx(1.0) and exp.advantages[0][~exp.loss_mask[0]].abs().max() == 0
    metrics = run.metrics(rollout)
    assert metrics["rollout/turns"].item() == pytest.approx(7 / 4) and metrics["rollout/turns_max"].item() == 2
    assert metrics["rollout/tool_calls"].item() == pytest.approx(3 / 4)
    assert metrics["rollout/tool_errors"].item() == pytest.approx(2 / 4)
    assert metrics["tools/calculator/calls"].item() == 2 and metrics["tools/calculator/errors"].item() == 1
    assert metrics["rollout/observation_tokens"].item() > 0 and metrics["rollout/template_mismatches"].item() == 0


def test_the_budget_ends_a_trajectory_before_an_observation_that_does_not_fit(kit):
    tok, paths = kit
    first_turn = len(tok(SCRIPT[0][0], add_special_tokens=False)["input_ids"]) + 1
    run = runner(
        tok, paths, ScriptedEngine(tok), {"tools": [calculator]}, GenerationSettings(max_new_tokens=first_turn + 5)
    )
    rollout = run.collect(0, batch(tok))
    t = rollout.trajectories[0]
    assert t.truncated and t.trajectory.turns == 1 and t.sample.finish_reason == "length"
    assert rollout.experience.loss_mask.shape[1] <= first_turn + 5


@pytest.mark.parametrize("shared", ["", "12+34=46 5+5=10 77+1=78 9+9=18 30+3=33 "])  # the second: 39 shared tokens
def test_one_turn_without_tools_is_the_single_turn_rollout(tiny_assets, shared):
    tok = load_tokenizer(tiny_assets["policy"])
    enc = tok([shared + p for p in ["12+34=", "5+5=", "77+1="]], return_tensors="pt", padding=True)
    prompts = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "prompts": ["a", "b", "c"],
        "columns": {},
    }
    experiences = []
    for multi_turn in (None, {"max_turns": 1}):
        actor = Actor.from_pretrained(tiny_assets["policy"], tok)
        policy = PolicySet(actor, None, None, LoadSettings(), tok, tiny_assets["policy"], uses_reference=False)
        engine = NativeEngine()
        engine.start(actor, "cpu")
        algorithm = AlgorithmSettings(advantage_estimator="grpo")
        scorer = RewardScorer(
            [RewardFunction(lambda prompts, responses: torch.tensor([len(r) / 5.0 for r in responses]))], algorithm, tok
        )
        run = RolloutRunner(
            policy,
            engine,
            scorer,
            generation=GenerationSettings(max_new_tokens=6, n_samples_per_prompt=2, temperature=1.3),
            rollout=RolloutSettings(engine=engine, multi_turn=multi_turn),
            algorithm=algorithm,
            kl=KLSettings(coef=0.0),
            kl_coef=KLController(0.0),
        )
        experiences.append(run.collect(3, prompts).experience)
    single, multi = experiences
    for field in ("sequences", "attention_mask", "loss_mask", "old_log_probs", "scores", "advantages", "returns"):
        assert torch.equal(getattr(single, field), getattr(multi, field)), field


class Quiz(Environment):
    """Asks a follow-up once, rewards each turn: 0.25 for the first answer, then ends with a final 1.0."""

    def reset(self, answer):
        self.answer, self.turn = answer, 0
        return None

    async def step(self, assistant_message):
        self.turn += 1
        if self.turn == 1:
            return Step([{"role": "user", "content": "Sure? " + "x " * 40}], reward=0.25)
        return Step(done=True, reward=0.5)

    def reward(self):
        return 1.0


class QuizEngine(ScriptedEngine):
    def generate(self, requests, generation, on_token=None):
        ids = self.tok("56", add_special_tokens=False)["input_ids"] + [self.eos]
        return [Sample(tuple(ids), tuple([-0.1] * len(ids)), "stop") for _ in requests]


@pytest.mark.parametrize("turn_rewards", ["sum", "last"])
def test_an_environments_turn_rewards_are_summed_or_placed_at_each_turns_last_token(kit, turn_rewards):
    tok, paths = kit
    settings = {"environment": Quiz, "max_turns": 3, "turn_rewards": turn_rewards, "max_observation_tokens": 6}
    rollout = runner(tok, paths, QuizEngine(tok), settings).collect(0, batch(tok))
    exp, t = rollout.experience, rollout.trajectories[0]
    assert t.trajectory.turns == 2 and t.turn_rewards == [0.25, 0.5]
    follow_up = t.completion[1]["content"]
    assert follow_up.startswith("Sure?") and len(tok(follow_up, add_special_tokens=False)["input_ids"]) <= 6  # cut
    exact_part = rollout.reward_parts["exact"][0].item()  # "56" is row 1's answer only
    if turn_rewards == "sum":  # 0.25 + 0.5 + the final 1.0, added to the score
        assert rollout.reward_parts["environment"][0].item() == pytest.approx(1.75)
        assert exp.scores[0].item() == pytest.approx(exact_part + 1.75)
        assert exp.rewards[0].sum().item() == pytest.approx(exact_part + 1.75)
    else:  # the final reward joins the score; each turn's reward sits on the turn's last sampled token
        assert exp.scores[0].item() == pytest.approx(exact_part + 1.0)
        first_end, second_end = t.turn_ends
        assert exp.rewards[0, first_end].item() == pytest.approx(0.25)
        assert exp.rewards[0, second_end].item() == pytest.approx(0.5 + exact_part + 1.0)


def test_turn_rewards_at_each_turn_need_a_token_level_estimator(tiny_assets):
    from tests.helpers import small_module

    with pytest.raises(ValueError, match="turn_rewards='last'.*grpo.*turn_rewards: sum"):
        small_module(
            tiny_assets,
            algorithm={"advantage_estimator": "grpo"},
            generation={"n_samples_per_prompt": 2},
            rollout={"multi_turn": {"environment": Quiz, "turn_rewards": "last"}},
        )


def test_a_template_that_ignores_tools_or_rewrites_turns_is_an_error_not_a_silent_mismatch(kit, tmp_path):
    tok, paths = kit
    plain = chat_tokenizer("chatml", ["What is 7*8?"] * 20)
    with pytest.raises(TemplateError, match="ignores tools"):
        check_renders_tools(plain, [tool_schema(calculator)])
    bad = tok.__class__.from_pretrained(paths["policy"])
    bad.chat_template = tok.chat_template.replace(
        "message['content'] + '<|im_end|>", "message['content'] | upper + '<|im_end|>"
    )  # renders the policy's turns otherwise than it sampled them
    with pytest.raises(TemplateError, match="does not start with what the policy sampled"):
        runner(bad, paths, ScriptedEngine(bad), {"tools": [calculator], "template_check": "strict"}).collect(
            0, batch(bad)
        )


def test_the_loop_runs_inside_a_running_event_loop_too(kit):
    """A notebook already runs an event loop: the turn loop then runs its own on a thread."""
    import asyncio

    tok, paths = kit
    run = runner(tok, paths, ScriptedEngine(tok), {"tools": [calculator], "max_turns": 3})

    async def inside():
        return run.collect(0, batch(tok))

    with torch.no_grad():
        rollout = asyncio.run(inside())
    assert [t.trajectory.turns for t in rollout.trajectories] == [2, 2, 1, 2]


class Echo(Environment):
    """Never done: answers every turn with a numbered message, so only the limits end a trajectory."""

    def reset(self, **row):
        self.turn = 0

    def step(self, assistant_message):
        self.turn += 1
        return Step([{"role": "user", "content": " ".join(f"w{self.turn}x{i}" for i in range(12))}])


@pytest.mark.parametrize("side", ["left", "middle", "right"])
def test_max_turns_and_the_observation_cut_hold_on_every_side(kit, side):
    tok, paths = kit
    settings = {"environment": Echo, "max_turns": 3, "max_observation_tokens": 8, "observation_truncate": side}
    rollout = runner(tok, paths, QuizEngine(tok), settings).collect(0, batch(tok))
    for t in rollout.trajectories:
        assert t.trajectory.turns == 3 and not t.truncated  # the third turn is the last: no observation after it
        observations = [m["content"] for m in t.completion if m["role"] == "user"]
        assert len(observations) == 2
        full = tok(" ".join(f"w1x{i}" for i in range(12)), add_special_tokens=False)["input_ids"]
        kept = tok(observations[0], add_special_tokens=False)["input_ids"]
        assert len(kept) <= 8 < len(full)
        expected = {"right": full[:8], "left": full[-8:], "middle": full[:4] + full[-4:]}[side]
        assert observations[0] == tok.decode(expected)
    assert rollout.experience.loss_mask.shape[1] <= 200  # within generation.max_new_tokens


def test_max_tool_calls_ends_a_trajectory_at_the_limit_without_running_more_calls(kit):
    tok, paths = kit

    class CallAgain(ScriptedEngine):  # every turn calls the calculator
        def generate(self, requests, generation, on_token=None):
            ids = self.tok(call("calculator", expression="2*3"), add_special_tokens=False)["input_ids"] + [self.eos]
            return [Sample(tuple(ids), tuple([-0.1] * len(ids)), "stop") for _ in requests]

    rollout = runner(tok, paths, CallAgain(tok), {"tools": [calculator], "max_turns": 5, "max_tool_calls": 2}).collect(
        0, batch(tok)
    )
    for t in rollout.trajectories:
        assert sum(t.tool_calls.values()) == 2 and t.trajectory.turns == 3  # two calls answered, the third not run
        assert [m["role"] for m in t.completion].count("tool") == 2


def test_every_rank_logs_the_same_tool_keys_summed_over_ranks(kit):
    """The tool counters' keys are the run's tools plus <malformed> and <unknown>, zeros included, so
    ranks whose policies called different tools log the same metrics (a different set would be a
    mismatched collective); the values are all-reduced sums."""
    tok, paths = kit
    run = runner(tok, paths, ScriptedEngine(tok), {"tools": [calculator], "max_turns": 3})
    rollout = run.collect(0, batch(tok))
    assert run.turn_loop.tool_names == ("calculator", "<malformed>", "<unknown>")
    local = run.metrics(rollout)
    assert {k for k in local if k.startswith("tools/")} == {
        f"tools/{name}/{what}" for name in run.turn_loop.tool_names for what in ("calls", "errors", "seconds")
    }
    assert local["tools/<unknown>/calls"].item() == 0 and local["tools/<malformed>/calls"].item() == 1
    run.all_reduce = lambda x: x * 2  # two ranks that rolled out the same
    doubled = run.metrics(rollout)
    assert doubled["tools/calculator/calls"].item() == 2 * local["tools/calculator/calls"].item() == 4
    assert doubled["rollout/tool_calls"].item() == pytest.approx(local["rollout/tool_calls"].item())  # a mean
