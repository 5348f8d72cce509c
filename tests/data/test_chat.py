"""Conversational data with real-world chat templates (ChatML, Llama-3 style): prompts, SFT masks, pairs."""

import json
from types import SimpleNamespace

import pytest

from lit_rlhf import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.data.chat import IGNORE_INDEX, DataError
from lit_rlhf.tasks import chat_tokenizer

CORPUS = ["be brief", "What is 2+3?", "It is 5.", "And 4+4?", "8, of course.", "Say hi", "hi there"] * 40
SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "What is 2+3?"}
ANSWER = {"role": "assistant", "content": "It is 5."}
USER2 = {"role": "user", "content": "And 4+4?"}
ANSWER2 = {"role": "assistant", "content": "8, of course."}


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tok(request):
    return chat_tokenizer(request.param, CORPUS)


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def attach(datamodule, tok):
    """Give a datamodule a tokenizer the way a Trainer would (through its LightningModule)."""
    datamodule.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    datamodule.setup("fit")
    return datamodule


def template_ids(tok, messages, **kwargs):
    out = tok.apply_chat_template(messages, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# --- PPO prompts ------------------------------------------------------------------------------


def test_conversational_prompts_end_with_the_generation_prompt_token_for_token(tok, tmp_path):
    path = write(tmp_path, [{"messages": [SYSTEM, USER], "answer": "5"}, {"messages": [USER]}])
    dm = attach(PromptDataModule(path, field="messages", apply_chat_template=True), tok)
    batch = dm.collate(dm.train_prompts)
    for row, messages in enumerate([[SYSTEM, USER], [USER]]):
        expected = template_ids(tok, messages, add_generation_prompt=True)
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == expected
        assert batch["prompts"][row] == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from lit_rlhf.rewards.inputs import MissingColumn

    answer = batch["columns"]["answer"]
    assert answer[0] == "5" and isinstance(answer[1], MissingColumn) and answer[1].row == 2
    assert batch["columns"]["prompt_messages"] == [[SYSTEM, USER], [USER]]
    assert "[{" not in batch["prompts"][0] and "be brief" in batch["prompts"][0]


def test_a_system_prompt_goes_before_plain_prompts(tok, tmp_path):
    path = write(tmp_path, [{"prompt": "What is 2+3?"}])
    dm = attach(PromptDataModule(path, apply_chat_template=True, system_prompt="be brief"), tok)
    assert dm.train_prompts[0].ids == template_ids(tok, [SYSTEM, USER], add_generation_prompt=True)
    raw = attach(PromptDataModule(path, apply_chat_template=False), tok)
    assert raw.train_prompts[0].text == "What is 2+3?"
    with pytest.raises(ValueError, match="system_prompt is a chat turn: it needs data.apply_chat_template: true"):
        PromptDataModule(path, system_prompt="be brief")


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": [USER, ANSWER]}, "row 2, field 'messages': the conversation ends with an assistant turn"),
        ({"messages": []}, "row 2, field 'messages': the conversation is empty"),
        ({"messages": None}, "row 2, field 'messages': expected a string or a list of messages, got NoneType None"),
        ({"messages": {"role": "user"}}, "row 2, field 'messages': expected a string or a list of messages, got dict"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "row 2, field 'messages': message 0 has unknown role 'robot'",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "row 2, field 'messages': message 0 content must be a string"),
        ({"messages": [{"text": "hi"}]}, "row 2, field 'messages': message 0 must be {'role': ..., 'content': ...}"),
        ({"question": "hi"}, "row 2, field 'messages': the prompt field is missing; .*\\['question'\\]"),
    ],
)
def test_bad_prompt_records_name_file_row_and_field(tok, tmp_path, record, message):
    path = write(tmp_path, [{"messages": [USER]}, record])
    with pytest.raises(DataError, match=f"data.jsonl, {message}"):
        attach(PromptDataModule(path, field="messages", apply_chat_template=True), tok)


def test_plain_prompt_records_are_checked_too(tok, tmp_path):
    path = write(tmp_path, [{"prompt": "hi"}, {"prompt": None}])
    with pytest.raises(DataError, match="row 2, field 'prompt': expected a string, got NoneType None"):
        attach(PromptDataModule(path), tok)
    path = write(tmp_path, [{"prompt": [USER]}], "conv.jsonl")
    with pytest.raises(DataError, match="conv.jsonl, row 1, field 'prompt': a conversation needs apply_chat_template"):
        attach(PromptDataModule(path, apply_chat_template=False), tok)


def test_a_malformed_line_is_named(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match="broken.jsonl, line 2: not valid JSON"):
        attach(PromptDataModule(str(path)), tok)


# --- SFT --------------------------------------------------------------------------------------


def trained_tokens(ids, labels):
    return [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


def test_sft_conversation_trains_every_assistant_turn_and_its_end_of_turn_token(tok, tmp_path):
    conversation = [SYSTEM, USER, ANSWER, USER2, ANSWER2]
    dm = attach(SFTDataModule(write(tmp_path, [{"messages": conversation}])), tok)
    ids, labels = dm.train_examples[0]
    full = template_ids(tok, conversation)
    assert ids == full[: len(ids)] and labels[: len(ids)] == labels
    expected = []
    for i in (2, 4):  # each assistant turn: its content tokens and the end-of-turn token, nothing else
        before = template_ids(tok, conversation[:i], add_generation_prompt=True)
        upto = template_ids(tok, conversation[: i + 1])
        turn = upto[len(before) :]
        turn = turn[: turn.index(tok.eos_token_id) + 1]
        assert tok.decode(turn[:-1]).strip() == conversation[i]["content"]
        expected += turn
    assert trained_tokens(ids, labels) == expected
    assert labels[-1] == tok.eos_token_id and ids[-1] == tok.eos_token_id, "the sequence ends at the last end-of-turn"


def test_sft_prompt_completion_trains_only_the_completion(tok, tmp_path):
    records = [
        {"prompt": "What is 2+3?", "completion": "It is 5."},
        {"prompt": [SYSTEM, USER], "completion": [ANSWER]},
        {"prompt": [SYSTEM, USER, ANSWER, USER2], "completion": "8, of course."},
    ]
    dm = attach(SFTDataModule(write(tmp_path, records)), tok)
    conversations = [[USER, ANSWER], [SYSTEM, USER, ANSWER], [SYSTEM, USER, ANSWER, USER2, ANSWER2]]
    for (ids, labels), conversation in zip(dm.train_examples, conversations, strict=True):
        prompt = template_ids(tok, conversation[:-1], add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[: len(prompt)])
        assert tok.decode(trained_tokens(ids, labels)[:-1]).strip() == conversation[-1]["content"]
        assert trained_tokens(ids, labels)[-1] == tok.eos_token_id


def test_sft_fields_are_settings_and_errors_name_them(tok, tmp_path):
    path = write(tmp_path, [{"question": "What is 2+3?", "answer": "It is 5."}])
    dm = attach(SFTDataModule(path, prompt_field="question", completion_field="answer"), tok)
    assert tok.decode(trained_tokens(*dm.train_examples[0])[:-1]).strip() == "It is 5."
    legacy = attach(SFTDataModule(write(tmp_path, [{"prompt": "Say hi", "response": "hi there"}], "r.jsonl")), tok)
    assert tok.decode(trained_tokens(*legacy.train_examples[0])[:-1]).strip() == "hi there"
    for record, message in [
        ({"prompt": "x"}, "row 1, field 'response': the completion field is missing"),
        ({"prompt": {"a": 1}, "completion": "y"}, "row 1, field 'prompt': expected a string or a list of messages"),
        ({"text": "x"}, "row 1: a record needs 'messages' \\(a conversation\\) or 'prompt' and a completion"),
        ({"messages": [USER]}, "row 1, field 'messages': the conversation has no assistant turn"),
    ]:
        with pytest.raises(DataError, match=message):
            attach(SFTDataModule(write(tmp_path, [record], "bad.jsonl")), tok)
    with pytest.raises(DataError, match="max_length=3 leaves no response token to train on"):
        attach(SFTDataModule(write(tmp_path, [{"messages": [SYSTEM, USER, ANSWER]}], "long.jsonl"), max_length=3), tok)


# --- preferences ------------------------------------------------------------------------------


def test_preference_pairs_explicit_and_implicit_prompt_give_the_same_rows(tok, tmp_path):
    worse = {"role": "assistant", "content": "8, of course."}
    explicit = {"prompt": [SYSTEM, USER], "chosen": [ANSWER], "rejected": [worse]}
    implicit = {"chosen": [SYSTEM, USER, ANSWER], "rejected": [SYSTEM, USER, worse]}
    plain_prompt = {"prompt": "What is 2+3?", "chosen": "It is 5.", "rejected": "8, of course."}
    dm = attach(PreferenceDataModule(write(tmp_path, [explicit, implicit, plain_prompt])), tok)
    a, b, c = dm.train_examples
    assert a == b
    assert a.chosen_ids == template_ids(tok, [SYSTEM, USER, ANSWER])[: len(a.chosen_ids)]
    assert tok.decode(trained_tokens(a.rejected_ids, a.rejected_labels)[:-1]).strip() == "8, of course."
    assert c.chosen_ids[: len(template_ids(tok, [USER], add_generation_prompt=True))] == template_ids(
        tok, [USER], add_generation_prompt=True
    )
    batch = dm.collate([a, c])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    with pytest.raises(DataError, match="row 1, field 'chosen': chosen and rejected share no prompt turn"):
        attach(PreferenceDataModule(write(tmp_path, [{"chosen": [ANSWER], "rejected": [worse]}], "x.jsonl")), tok)
    with pytest.raises(DataError, match="row 1, field 'rejected': the field is missing"):
        attach(PreferenceDataModule(write(tmp_path, [{"prompt": "p", "chosen": "c"}], "y.jsonl")), tok)


def test_sft_on_a_tool_conversation_trains_the_assistant_turns_token_for_token_not_the_tool_results(tmp_path):
    from lit_rlhf.rollout.multi_turn.tools import tool_schema

    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: the expression.
        """
        return str(eval(expression))

    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
    tok = chat_tokenizer("qwen_tools", CORPUS + [call, "tool_response 5"] * 20)
    conversation = [
        USER,
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "calculator", "content": "5"},
        ANSWER,
    ]
    tools = [tool_schema(calculator)]
    dm = attach(SFTDataModule(write(tmp_path, [{"messages": conversation, "tools": tools}]), max_length=2048), tok)
    ids, labels = dm.train_examples[0]
    full = template_ids(tok, conversation, tools=tools)
    assert ids == full[: len(ids)]
    assert "calculator" in tok.decode(ids[:20]) or "<tools>" in tok.decode(ids)  # the schemas are in the prompt
    expected = []
    for i in (1, 3):  # the call and the answer; the tool's result (turn 2) is context
        before = template_ids(tok, conversation[:i], tools=tools, add_generation_prompt=True)
        upto = template_ids(tok, conversation[: i + 1], tools=tools)
        turn = upto[len(before) :]
        expected += turn[: turn.index(tok.eos_token_id) + 1]
    assert trained_tokens(ids, labels) == expected
    trained = tok.decode(trained_tokens(ids, labels))
    assert call in trained and "It is 5." in trained and "tool_response" not in trained
    with pytest.raises(DataError, match="row 1, field 'tools'.*list of JSON tool schemas"):
        bad = write(tmp_path, [{"messages": conversation, "tools": "calculator"}], "bad.jsonl")
        attach(SFTDataModule(bad, max_length=2048), tok)
