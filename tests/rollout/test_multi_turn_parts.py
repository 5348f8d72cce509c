"""The parts of multi-turn rollouts: tool schemas and calls, the tool environment, and token-exact
trajectories built from sampled ids and chat-template suffix diffs."""

import asyncio
import json

import pytest

from lit_rlhf.rollout.multi_turn.environment import Environment, Step, ToolEnvironment
from lit_rlhf.rollout.multi_turn.tokens import TemplateError, Trajectory
from lit_rlhf.rollout.multi_turn.tools import HermesToolParser, Toolbox, ToolCall, tool_schema
from lit_rlhf.tasks import chat_tokenizer
from tests.rollout.scripted import calculator


async def slow_echo(text: str) -> str:
    """Echo the text after a pause.

    Args:
        text: what to echo.
    """
    await asyncio.sleep(0.2)
    return text


def call(name, **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


# --- tools ----------------------------------------------------------------------------------------


def test_a_tool_schema_comes_from_its_hints_and_docstring_and_a_bare_function_is_refused():
    schema = tool_schema(calculator)
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    assert schema["function"]["parameters"]["required"] == ["expression"]

    def bare(x):
        return x

    with pytest.raises(ValueError, match="tool .*bare.*type hints .*Google-style docstring"):
        tool_schema(bare)


def test_the_hermes_parser_reads_every_call_and_names_what_is_malformed():
    text = (
        call("calculator", expression="1+2")
        + " and "
        + '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"3\\"}"}</tool_call>'
    )
    parsed = HermesToolParser().parse(text)
    assert parsed.calls == [ToolCall("calculator", {"expression": "1+2"}), ToolCall("calculator", {"expression": "3"})]
    assert not parsed.errors
    bad = HermesToolParser().parse(
        '<tool_call>{"name": calc</tool_call> <tool_call>[1]</tool_call> <tool_call>{"name": "x"'
    )
    assert bad.calls == [] and len(bad.errors) == 3
    assert "not valid JSON" in bad.errors[0] and '"name" string' in bad.errors[1] and "not closed" in bad.errors[2]
    assert not HermesToolParser().parse("the answer is 5535").any


def test_failures_become_tool_messages_and_slow_calls_of_a_turn_run_together():
    box = Toolbox([calculator, slow_echo], timeout_s=5.0)
    results = asyncio.run(
        box.run(
            [
                ToolCall("calculator", {"expression": "123*45"}),
                ToolCall("calculator", {"expr": "1"}),  # wrong argument
                ToolCall("calculator", {"expression": "import os"}),  # the tool raises
                ToolCall("search", {"q": "x"}),  # unknown
                ToolCall("slow_echo", {"text": "a"}),
                ToolCall("slow_echo", {"text": "b"}),
            ]
        )
    )
    assert [r.content for r in results][:1] == ["5535"] and [r.error for r in results] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    assert "wrong arguments" in results[1].content and "raised ValueError" in results[2].content
    assert "unknown tool 'search'" in results[3].content and "calculator" in results[3].content
    assert max(r.seconds for r in results[4:]) < 0.35  # both pauses of 0.2 s overlapped
    timed_out = asyncio.run(Toolbox([slow_echo], timeout_s=0.05).call(ToolCall("slow_echo", {"text": "a"})))
    assert timed_out.error and "timed out" in timed_out.content


def test_the_tool_environment_counts_calls_and_errors_and_ends_without_a_call_or_at_the_limit():
    env = ToolEnvironment([calculator], max_tool_calls=2)
    env.reset(answer="5535")
    first = asyncio.run(env.step(call("calculator", expression="123*45") + call("calc", expression="1")))
    assert not first.done and [m["content"] for m in first.messages][0] == "5535"
    assert all(m["role"] == "tool" for m in first.messages) and "unknown tool" in first.messages[1]["content"]
    # a tool the run does not have is counted as <unknown>: the counters' names stay a known set
    assert env.calls == {"calculator": 1, "<unknown>": 1} and env.errors == {"<unknown>": 1}
    assert first.messages[1]["name"] == "calc"  # the tool message still answers the name the policy wrote
    assert asyncio.run(env.step(call("calculator", expression="1+1"))).done  # the limit of 2 is reached
    assert asyncio.run(ToolEnvironment([calculator]).step("it is 5535")).done  # no call: the policy answered
    assert isinstance(env, Environment) and Step().messages == [] and not Step().done


# --- token-exact trajectories -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    corpus = ["What is 123*45? " + call("calculator", expression="123*45") + " 5535 hello he llo tool_response"] * 60
    return chat_tokenizer("qwen_tools", corpus)


def test_sampled_ids_stay_verbatim_and_observations_are_the_templates_suffix(tok):
    tools = [tool_schema(calculator)]
    trajectory = Trajectory(tok, [{"role": "user", "content": "What is 123*45?"}], tools)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # a BPE-ambiguous turn: "he" + "llo" sampled as two tokens the tokenizer would not produce for "hello"
    he, llo = tok("he", add_special_tokens=False)["input_ids"], tok("llo", add_special_tokens=False)["input_ids"]
    turn1 = he + llo + tok(" " + call("calculator", expression="123*45"), add_special_tokens=False)["input_ids"] + [eos]
    text = trajectory.add_turn(turn1, [-0.5] * len(turn1))
    assert text.startswith("hello <tool_call>")
    observation = trajectory.add_observation([{"role": "tool", "name": "calculator", "content": "5535"}])
    turn2 = tok("5535", add_special_tokens=False)["input_ids"] + [eos]
    trajectory.add_turn(turn2, [-0.25] * len(turn2))
    ids, mask = trajectory.response_ids, trajectory.loss_mask
    assert ids == turn1 + observation + turn2  # every sampled id verbatim and in order
    assert mask == [1] * len(turn1) + [0] * len(observation) + [1] * len(turn2)
    assert trajectory.log_probs == [-0.5] * len(turn1) + [0.0] * len(observation) + [-0.25] * len(turn2)
    # the observation: the junction after <|im_end|>, the tool result, the next generation prompt
    assert (
        tok.decode(observation)
        == "\n<|im_start|>user\n<tool_response>\n5535\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
    assert "5535" in trained and "tool_response" not in trained  # the tool's text is never trained on
    assert trajectory.check() is None  # the text equals the template's full rendering
    assert trajectory.turns == 2 and [m["role"] for m in trajectory.messages] == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]


def test_a_turn_cut_at_the_budget_gets_its_closing_tokens_from_the_template(tok):
    trajectory = Trajectory(tok, [{"role": "user", "content": "What is 123*45?"}], [tool_schema(calculator)])
    cut = tok(call("calculator", expression="123*45"), add_special_tokens=False)["input_ids"]  # no <|im_end|>
    trajectory.add_turn(cut, [-1.0] * len(cut))
    observation = trajectory.add_observation([{"role": "tool", "name": "calculator", "content": "5535"}])
    assert tok.decode(observation).startswith("<|im_end|>\n<|im_start|>user")  # inserted, not trained on
    assert trajectory.check() is None


def test_a_template_that_rewrites_history_is_an_error_and_a_drifting_one_is_reported(tok):
    llama = chat_tokenizer("llama3", ["hello world 5535"] * 40)  # its template trims assistant content
    trajectory = Trajectory(llama, [{"role": "user", "content": "hi"}])
    trajectory.add_turn(llama(" hello ", add_special_tokens=False)["input_ids"], [0.0] * 3)
    with pytest.raises(TemplateError, match="does not start with what the policy sampled"):
        trajectory.add_observation([{"role": "user", "content": "more"}])
    trajectory = Trajectory(tok, [{"role": "user", "content": "hi"}])
    trajectory.add_turn(tok("5535", add_special_tokens=False)["input_ids"], [0.0])
    trajectory.response_ids += tok("x", add_special_tokens=False)["input_ids"]  # ids the template would not write
    assert "differ at character" in trajectory.check()


# --- the templates of other model families ----------------------------------------------------------

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Qwen3 style: the reasoning of earlier assistant turns is dropped from the history
THINKING_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def two_turns(tok, first: str, eos: str):
    trajectory = Trajectory(tok, [{"role": "user", "content": "What is 7*8?"}])
    end = tok.convert_tokens_to_ids(eos)
    turn = tok(first, add_special_tokens=False)["input_ids"] + [end]
    trajectory.add_turn(turn, [0.0] * len(turn))
    observation = trajectory.add_observation([{"role": "user", "content": "Sure?"}])
    answer = tok("56", add_special_tokens=False)["input_ids"] + [end]
    trajectory.add_turn(answer, [0.0] * len(answer))
    return trajectory, observation


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_llama3_and_gemma_templates_continue_token_for_token(family):
    from lit_rlhf.tasks.tiny import PAD, train_tokenizer

    corpus = ["What is 7*8? 56 Sure? hello"] * 40
    if family == "llama3":
        tok, eos, junction = chat_tokenizer("llama3", corpus), "<|eot_id|>", ""
    else:
        specials = [PAD, "<bos>", "<start_of_turn>", "<end_of_turn>"]
        tok = train_tokenizer(corpus, "bpe", 256, specials, "<bos>", "<end_of_turn>", GEMMA_TEMPLATE)
        eos, junction = "<end_of_turn>", "\n"
    trajectory, observation = two_turns(tok, "56", eos)
    assert trajectory.check() is None
    assert tok.decode(observation).startswith(
        junction + ("<|start_header_id|>user" if family == "llama3" else "<start_of_turn>user")
    )
    assert trajectory.loss_mask.count(0) == len(observation)


def test_a_template_that_drops_earlier_reasoning_is_a_clear_error():
    from lit_rlhf.tasks.tiny import PAD, train_tokenizer

    specials = [PAD, "<|im_start|>", "<|im_end|>"]
    tok = train_tokenizer(
        ["<think>hm</think>56 Sure? What is 7*8?"] * 40, "bpe", 256, specials, None, "<|im_end|>", THINKING_TEMPLATE
    )
    with pytest.raises(TemplateError, match="does not render this conversation incrementally.*strip"):
        two_turns(tok, "<think>hm</think>56", "<|im_end|>")


def test_a_rollouts_sync_calls_wait_together_not_in_turns_of_a_few_threads():
    """48 rows' sync calls of 0.1 s each, as the turn loop issues them (one ``run`` per row, gathered):
    they overlap on the toolbox's threads; asyncio's default executor (min(32, cpus + 4) workers)
    would take them in turns."""
    import time

    def sleepy_echo(text: str) -> str:
        """Echo the text after a blocking pause.

        Args:
            text: what to echo.
        """
        time.sleep(0.1)
        return text

    box = Toolbox([sleepy_echo], threads=64)

    async def rollout():
        return await asyncio.gather(*(box.run([ToolCall("sleepy_echo", {"text": str(i)})]) for i in range(48)))

    start = time.perf_counter()
    results = asyncio.run(rollout())
    assert [r[0].content for r in results] == [str(i) for i in range(48)]
    assert time.perf_counter() - start < 0.5  # 48 x 0.1 s, overlapped (in turns of 6 it would be 0.8 s)
