"""A chat template that refuses a conversation (Gemma's "System role not supported") names the file, row and fix."""

import json
from types import SimpleNamespace

import pytest

from lit_rlhf import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.data.chat import DataError
from lit_rlhf.tasks import chat_tokenizer

CORPUS = ["be brief", "What is 2+3?", "It is 5.", "It is 6."] * 40
SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "What is 2+3?"}
ANSWER = {"role": "assistant", "content": "It is 5."}
WORSE = {"role": "assistant", "content": "It is 6."}

# ChatML turns that refuse a system turn the way Gemma's template does, and (like Llama 2's)
# refuse two user turns in a row
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    tokenizer = chat_tokenizer("chatml", CORPUS)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    return tokenizer


def load(datamodule, tok, tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    datamodule.hparams.path = str(path)
    datamodule.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    datamodule.setup("fit")
    return datamodule


def test_a_system_prompt_the_template_refuses_names_the_row_and_the_setting(tok, tmp_path):
    dm = PromptDataModule("x.jsonl", apply_chat_template=True, system_prompt="be brief")
    with pytest.raises(DataError) as err:
        load(dm, tok, tmp_path, [{"prompt": "What is 2+3?"}])
    message = str(err.value)
    assert "data.jsonl, row 1, field 'prompt': the chat template" in message
    assert "TemplateError: System role not supported" in message
    assert "remove data.system_prompt" in message
    dm = PromptDataModule("x.jsonl", apply_chat_template=True)  # the fix works
    assert load(dm, tok, tmp_path, [{"prompt": "What is 2+3?"}]).train_prompts[0].text.startswith("<|im_start|>user")


@pytest.mark.parametrize(
    "datamodule,record,field",
    [
        (
            lambda: PromptDataModule("x.jsonl", field="messages", apply_chat_template=True),
            {"messages": [SYSTEM, USER]},
            "messages",
        ),
        (lambda: SFTDataModule("x.jsonl"), {"messages": [SYSTEM, USER, ANSWER]}, "messages"),
        (lambda: SFTDataModule("x.jsonl"), {"prompt": [SYSTEM, USER], "completion": "It is 5."}, "prompt"),
        (
            lambda: PreferenceDataModule("x.jsonl"),
            {"prompt": [SYSTEM, USER], "chosen": "It is 5.", "rejected": "It is 6."},
            "prompt",
        ),
        (
            lambda: PreferenceDataModule("x.jsonl"),
            {"chosen": [SYSTEM, USER, ANSWER], "rejected": [SYSTEM, USER, WORSE]},
            "chosen",
        ),
    ],
)
def test_a_system_message_the_template_refuses_names_file_row_field_and_fix(tok, tmp_path, datamodule, record, field):
    good = {k: v[1:] if isinstance(v, list) else v for k, v in record.items()}  # the same without the system turn
    with pytest.raises(DataError) as err:
        load(datamodule(), tok, tmp_path, [good, record])
    message = str(err.value)
    assert f"data.jsonl, row 2, field {field!r}: the chat template" in message
    assert "System role not supported" in message
    assert "merge the system message's text into the first user turn" in message
    assert "system_prompt" not in message, "the record's own system turn: the setting is not the cause"


def test_other_template_errors_name_the_row_too(tok, tmp_path):
    record = {"messages": [USER, {"role": "user", "content": "And 4+4?"}, ANSWER]}
    with pytest.raises(DataError, match="data.jsonl, row 1, field 'messages': .*Conversation roles must alternate"):
        load(SFTDataModule("x.jsonl"), tok, tmp_path, [record])
