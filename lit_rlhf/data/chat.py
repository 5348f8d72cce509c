"""Records as the model sees them: plain text or conversations, rendered with the chat template.

Three shapes of data, as TRL's and OpenRLHF's users have them:

- a plain string (``"07+45="``), wrapped as one user turn when a chat template is applied;
- a conversation: a list of ``{"role", "content"}`` messages (``system``, ``user``, ``assistant``,
  ``tool``);
- for preferences, two conversations that share their prompt turns (implicit prompt).

Every check names the file, the row and the field of the bad value; nothing is stringified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from jinja2 import TemplateError

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100


class DataError(ValueError):
    """A record that cannot be used as it is; the message names the file, the row and the field."""


class Where(NamedTuple):
    """Where a value comes from: file, row (1-based; a JSONL file's line) and field."""

    path: str
    row: int
    field: str

    def __str__(self) -> str:
        return f"{self.path}, row {self.row}, field {self.field!r}"


def as_text(value: Any, where: Where) -> str:
    """``value`` if it is a string; anything else (None, a dict, a list) is an error."""
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {_describe(value)}")
    return value


def as_messages(value: Any, where: Where) -> list[dict]:
    """``value`` as a non-empty list of ``{"role", "content"}`` messages with known roles."""
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of messages, got {_describe(value)}")
    if not value:
        raise DataError(f"{where}: the conversation is empty")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be {{'role': ..., 'content': ...}}, got {_describe(message)}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {message['role']!r}; valid: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i} content must be a string, got {_describe(message['content'])}")
    # a tool message's ``name`` and an assistant's ``tool_calls`` stay: templates render them
    return [{k: m[k] for k in ("role", "content", "name", "tool_calls") if k in m} for m in value]


def is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def as_turns(value: Any, where: Where, role: str) -> list[dict]:
    """A string as one ``role`` turn, or a list as messages."""
    if is_conversation(value):
        return as_messages(value, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string or a list of messages, got {_describe(value)}")
    return [{"role": role, "content": value}]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def check_template(tokenizer: Any, apply_chat_template: bool) -> None:
    """A chat template must exist when it is to be applied."""
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"apply_chat_template is true but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
            "template; set apply_chat_template: false (plain text) or use a tokenizer that has one"
        )


def render_prompt(
    tokenizer: Any, value: Any, where: Where, apply_chat_template: bool, system_prompt: str | None = None
) -> str:
    """A PPO prompt as the policy sees it: the chat template with the generation prompt, or raw text.

    Raises:
        DataError: a conversation without a chat template, or one whose last turn is the
            assistant's (the policy must answer last), or a value of the wrong type.
    """
    if not apply_chat_template:
        if is_conversation(value):
            raise DataError(f"{where}: a conversation needs apply_chat_template: true to be rendered")
        text = as_text(value, where)
        if not text.strip():
            raise DataError(f"{where}: the prompt is empty")
        return text
    messages = as_turns(value, where, "user")
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{where}: the prompt is empty")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the conversation ends with an assistant turn; for PPO the model must answer last")
    added = system_prompt is not None and messages[0]["role"] != "system"
    if added:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return render(tokenizer, messages, where, add_generation_prompt=True, system_prompt_added=added)


def render(
    tokenizer: Any,
    messages: list[dict],
    where: Where,
    add_generation_prompt: bool = False,
    system_prompt_added: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """``messages`` rendered (as text) with the tokenizer's chat template (and the ``tools`` schemas).

    Templates refuse conversations with ``raise_exception`` (Gemma's "System role not supported",
    Llama 2's "roles must alternate"); that surfaces here as a ``DataError`` naming the record, not
    as a bare Jinja error from deep inside a datamodule.

    Raises:
        DataError: the template raised; the message names the row, the template's words and the fix.
    """
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as err:
        raise DataError(f"{where}: {_template_problem(tokenizer, messages, err, system_prompt_added)}") from err


def _template_problem(tokenizer: Any, messages: list[dict], err: TemplateError, system_prompt_added: bool) -> str:
    """What the chat template refused, in its own words, and what to change."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    problem = f"the chat template of {name!r} rejects this conversation ({type(err).__name__}: {err})"
    if "system" not in str(err).lower() or not any(m["role"] == "system" for m in messages):
        return f"{problem}; change the record to what the template accepts, or use a tokenizer whose template does"
    if system_prompt_added:  # the system turn is ours, not the user's record's
        return (
            f"{problem}: it has no system role and data.system_prompt adds one; remove data.system_prompt and put "
            "its instruction into the prompts' user turns, or use a tokenizer whose template has a system role"
        )
    return (
        f"{problem}: it has no system role; merge the system message's text into the first user turn "
        "(as Gemma 3's own template does), or use a tokenizer whose template has a system role"
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def conversation_ids(
    tokenizer: Any, messages: list[dict], where: Where, train_from: int = 0, tools: list[dict] | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and labels that train its assistant turns from ``train_from`` on.

    A tool-use conversation (``tool`` messages, the assistant's calls, the ``tools`` schemas the
    template renders into the prompt) trains its assistant turns only: tool results are context.

    Each assistant turn's tokens are the difference between the conversation rendered up to and
    including that turn and the one rendered up to it with the generation prompt; they are
    labelled up to and including their end-of-turn (EOS) token, and whatever the template writes
    after it (a newline) is not. The sequence ends at the last labelled token.

    Raises:
        DataError: no assistant turn, or a template that renders earlier turns differently once
            later turns follow (the prefixes would not line up).
    """
    full = _ids(tokenizer, render(tokenizer, messages, where, tools=tools))
    labels = [IGNORE_INDEX] * len(full)
    eos = _eos_ids(tokenizer)
    end = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = _ids(tokenizer, render(tokenizer, messages[:i], where, add_generation_prompt=True, tools=tools))
        upto = _ids(tokenizer, render(tokenizer, messages[: i + 1], where, tools=tools))
        if full[: len(upto)] != upto or upto[: len(before)] != before:
            raise DataError(
                f"{where}: the chat template renders turn {i} differently once later turns follow, so its tokens "
                "cannot be located; use prompt-completion records for this template"
            )
        stop = len(upto)
        eos_positions = [j for j in range(len(before), len(upto)) if upto[j] in eos]
        if eos_positions:
            stop = eos_positions[-1] + 1
        labels[len(before) : stop] = full[len(before) : stop]
        end = stop
    if not end:
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return full[:end], labels[:end]


def plain_ids(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Raw text without a template: ``prompt`` (with the tokenizer's special tokens) + completion + EOS."""
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = _ids(tokenizer, completion) + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _eos_ids(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, Sequence) else {eos}


def split_shared_prompt(chosen: list[dict], rejected: list[dict], where: Where) -> tuple[list, list, list]:
    """``(prompt, chosen_completion, rejected_completion)`` of two conversations sharing their first turns.

    Raises:
        DataError: the conversations share no turn, or one of them has nothing after the shared part.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{where}: chosen and rejected share no prompt turn; add a prompt field")
    if shared == len(chosen) or shared == len(rejected):
        raise DataError(f"{where}: chosen and rejected must differ after their shared prompt turns")
    if chosen[shared]["role"] != "assistant" or rejected[shared]["role"] != "assistant":
        raise DataError(f"{where}: after the shared prompt turns, chosen and rejected must continue with the assistant")
    return chosen[:shared], chosen[shared:], rejected[shared:]
