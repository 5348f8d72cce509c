"""The embedded tool-use task's pieces: the calculator, the data files, the tokenizer, the rewards."""

import json

import pytest

from lit_rlhf.rollout.multi_turn.tools import HermesToolParser, tool_schema
from lit_rlhf.tasks import tool_use


def test_calculator_evaluates_integer_expressions_and_refuses_the_rest():
    assert tool_use.calculator("347*58") == "20126"
    assert tool_use.calculator(" (2+3)*-4 ") == "-20"
    assert tool_use.calculator("17//5") == "3" and tool_use.calculator("17%5") == "2"
    for bad, message in [
        ("2**10", "only integers"),
        ("1.5*2", "only integers"),
        ("__import__('os')", "only integers"),
        ("3*", "not an arithmetic expression"),
        ("1//0", "division by zero"),
        ("9" * 70, "at most 64"),
    ]:
        with pytest.raises(ValueError, match=message):
            tool_use.calculator(bad)
    schema = tool_schema(tool_use.calculator)["function"]
    assert schema["name"] == "calculator" and schema["parameters"]["required"] == ["expression"]


def test_the_call_text_parses_to_the_calculator_call():
    parsed = HermesToolParser().parse(tool_use.call_text("347*58"))
    assert [(c.name, c.arguments) for c in parsed.calls] == [("calculator", {"expression": "347*58"})]


def test_guesses_have_the_products_size_and_ends_but_are_wrong_digits_between():
    import random

    rng = random.Random(0)
    guesses = [(a, b, tool_use.guess(a, b, rng)) for a, b in tool_use.problems(0)[:2000]]
    assert all(len(g) == len(str(a * b)) and g[0] == str(a * b)[0] and g[-1] == str(a * b)[-1] for a, b, g in guesses)
    right = sum(g == str(a * b) for a, b, g in guesses) / len(guesses)
    assert right < 0.02  # a guess is right only by luck (1 in 100 to 1 in 1000)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rewards_read_the_final_answer_and_the_tool_calls():
    responses = ["20126", "The answer is 20,126.", "20127", call := tool_use.call_text("347*58"), ""]
    reward = tool_use.answer_reward(None, responses, ["20126"] * 5)
    assert reward.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # a turn that calls a tool is no answer
    completions = [
        [
            {"role": "assistant", "content": call},
            {"role": "tool", "content": "20126"},
            {"role": "assistant", "content": "20126"},
        ],
        [{"role": "assistant", "content": "20000"}],
        [{"role": "tool", "content": "<tool_call> in a tool's text is not a call"}],
    ]
    assert tool_use.tool_call_rate(None, ["", "", ""], completions).tolist() == [1.0, 0.0, 0.0]


def test_prepare_writes_disjoint_prompt_files_and_conversations_with_the_tool(tmp_path):
    from lit_rlhf.models import load_tokenizer

    tool_use.prepare(str(tmp_path), sft_size=400, rl_prompts=64, test_prompts=32)
    rows = {name: read(tmp_path / name) for name in ("prompts.jsonl", "test_prompts.jsonl")}
    assert [len(v) for v in rows.values()] == [64, 32]
    for row in rows["prompts.jsonl"] + rows["test_prompts.jsonl"]:
        a, b = map(int, row["prompt"].removeprefix("What is ").removesuffix("?").split("*"))
        assert row["answer"] == str(a * b) and 100 <= a <= 999 and 10 <= b <= 99
    assert not {r["prompt"] for r in rows["prompts.jsonl"]} & {r["prompt"] for r in rows["test_prompts.jsonl"]}
    sft = read(tmp_path / "sft.jsonl")
    test_questions = {r["prompt"] for r in rows["test_prompts.jsonl"]}
    assert not {r["messages"][0]["content"] for r in sft} & test_questions  # SFT never sees a test problem
    calls = [r for r in sft if len(r["messages"]) == 4]
    assert 0.42 < len(calls) / len(sft) < 0.58  # tool_fraction 0.5
    for r in calls:
        user, call, result, answer = r["messages"]
        assert result == {"role": "tool", "name": "calculator", "content": answer["content"]}
        assert (
            tool_use.calculator(HermesToolParser().parse(call["content"]).calls[0].arguments["expression"])
            == answer["content"]
        )
    assert all(r["tools"] == [tool_schema(tool_use.calculator)] for r in sft)
    tok = load_tokenizer(str(tmp_path / "base"))
    # every digit its own token; the chat template's fixed text compresses to few tokens
    text = tok.apply_chat_template(calls[0]["messages"], tools=calls[0]["tools"], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits and all(len(d) == 1 for d in digits)
    assert len(ids) < 100 < len(text) / 4


def test_held_out_reads_each_validation(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,reward/mean,val/accuracy,val/tool_call_rate\n0,0,,0.1,0.3\n0,1,0.2,,\n4,9,0.5,0.6,0.9\n")
    assert tool_use.held_out(str(csv)) == [
        {"epoch": 0, "accuracy": 0.1, "tool_call_rate": 0.3},
        {"epoch": 4, "accuracy": 0.6, "tool_call_rate": 0.9},
    ]


def test_stage_seconds_reads_the_timed_stages_files(tmp_path):
    from lit_rlhf.tasks.machine import stage_seconds

    (tmp_path / "sft_seconds.txt").write_text("132\n")
    (tmp_path / "grpo_seconds.txt").write_text("47")
    assert stage_seconds(str(tmp_path), ("prepare", "sft", "grpo")) == {"sft": 132.0, "grpo": 47.0}
