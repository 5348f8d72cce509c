"""Token-exact trajectories: the policy's sampled ids verbatim, observations as chat-template suffix diffs.

Nothing the policy sampled is ever decoded and encoded again (a BPE tokenizer may split the same
text differently: "he" + "llo" is not "hello"). A trajectory's ids are the prompt's, then each
turn's sampled ids, then each observation's ids, where an observation is the tail that the chat
template adds when the new messages join the conversation: render the conversation with and
without them and tokenize the difference. The *junction* is what the template writes after an
assistant turn that the policy did not sample (ChatML's ``\\n`` after ``<|im_end|>``, or the whole
``<|im_end|>\\n`` when a turn was cut at the token budget); it is inserted before the observation.
Junction and observation tokens have ``loss_mask`` 0 and no log-prob.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

Message = dict[str, Any]
TemplateCheck = Literal["strict", "warn", "off"]


class TemplateError(ValueError):
    """The chat template does not render the conversation incrementally (the message says where)."""


def render(tokenizer: Any, messages: Sequence[Message], tools: list[dict] | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tools=tools or None, add_generation_prompt=generation_prompt, tokenize=False
    )


class Trajectory:
    """One conversation's token ids as the policy saw and wrote them, built turn by turn.

    Args:
        tokenizer: the actor's (its chat template renders the conversation).
        messages: the conversation up to the first assistant turn (the row's prompt).
        tools: the tool schemas the template renders into the prompt (None: no tools).
        prompt_ids: the prompt's ids if already tokenized (default: the rendered prompt with its
            generation prompt, tokenized).
    """

    def __init__(
        self,
        tokenizer: Any,
        messages: Sequence[Message],
        tools: list[dict] | None = None,
        prompt_ids: Sequence[int] | None = None,
    ) -> None:
        self.tokenizer, self.tools = tokenizer, tools
        self.messages: list[Message] = list(messages)
        self.prompt_messages = len(self.messages)  # the messages before the first assistant turn
        if prompt_ids is None:
            prompt_ids = self._encode(render(tokenizer, self.messages, tools, generation_prompt=True))
        self.prompt_ids = list(prompt_ids)
        self.response_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.log_probs: list[float] = []
        self.turns = 0
        self._before_turn = len(self.messages)  # the messages before the latest assistant turn
        self._turn_ids: list[int] = []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add_turn(self, token_ids: Sequence[int], log_probs: Sequence[float]) -> str:
        """Append an assistant turn's sampled ids verbatim (trained on); returns its text (special tokens
        skipped), which joins the conversation as the assistant message."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        self._before_turn = len(self.messages)
        self.messages.append({"role": "assistant", "content": text})
        self.response_ids += list(token_ids)
        self.loss_mask += [1] * len(token_ids)
        self.log_probs += list(log_probs)
        self._turn_ids = list(token_ids)
        self.turns += 1
        return text

    def observation_ids(self, new_messages: Sequence[Message]) -> list[int]:
        """The ids that follow the latest assistant turn when ``new_messages`` join: the junction the
        template adds after the turn, then the new messages, then the next generation prompt."""
        before = render(self.tokenizer, self.messages[: self._before_turn], self.tools, generation_prompt=True)
        with_turn = render(self.tokenizer, self.messages, self.tools, generation_prompt=False)
        following = render(self.tokenizer, [*self.messages, *new_messages], self.tools, generation_prompt=True)
        if not with_turn.startswith(before) or not following.startswith(with_turn):
            raise TemplateError(
                "the chat template does not render this conversation incrementally (a turn changes how the "
                "earlier ones render, as templates that strip a model's thinking from history do): "
                f"{self._first_difference(with_turn, following)}; multi-turn rollouts need a template whose "
                "rendering of a conversation starts with the rendering of every shorter one"
            )
        rendered_turn = with_turn[len(before) :]
        sampled = self.tokenizer.decode(self._turn_ids, skip_special_tokens=False)
        if not rendered_turn.startswith(sampled):
            raise TemplateError(
                f"the chat template renders the assistant turn as {rendered_turn[:120]!r}, which does not start "
                f"with what the policy sampled, {sampled[:120]!r} (a template that trims or rewrites assistant "
                "content cannot be continued token for token)"
            )
        junction = rendered_turn[len(sampled) :]
        return self._encode(junction + following[len(with_turn) :])

    def add_observation(self, new_messages: Sequence[Message], ids: Sequence[int] | None = None) -> list[int]:
        """Append the observation (``observation_ids``, unless already computed as ``ids``): attended
        to, never trained on."""
        ids = self.observation_ids(new_messages) if ids is None else list(ids)
        self.messages.extend(new_messages)
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.log_probs += [0.0] * len(ids)
        return ids

    def check(self) -> str | None:
        """None if the ids decode to the full rendering of the final conversation (up to the closing
        junction of the last turn), else where and how they differ.

        Text, not ids, is compared: the policy's sampled ids are kept even where the tokenizer would
        split the same text otherwise.
        """
        ends_with_turn = self.turns > 0 and self.messages[-1]["role"] == "assistant"
        full = render(self.tokenizer, self.messages, self.tools, generation_prompt=not ends_with_turn)
        ours = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        slack = self._closing_junction() if ends_with_turn else ""
        if full.startswith(ours) and full[len(ours) :] == slack:
            return None
        return self._first_difference(ours, full)

    def _closing_junction(self) -> str:
        before = render(self.tokenizer, self.messages[: self._before_turn], self.tools, generation_prompt=True)
        with_turn = render(self.tokenizer, self.messages, self.tools, generation_prompt=False)
        sampled = self.tokenizer.decode(self._turn_ids, skip_special_tokens=False)
        return with_turn[len(before) :][len(sampled) :]

    @staticmethod
    def _first_difference(a: str, b: str) -> str:
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return f"they differ at character {at}: {a[max(0, at - 40) : at + 40]!r} vs {b[max(0, at - 40) : at + 40]!r}"


def check_renders_tools(tokenizer: Any, schemas: list[dict]) -> None:
    """The chat template must render the tool schemas into the prompt (else the policy never sees them).

    Raises:
        TemplateError: naming the template's tokenizer and the fix.
    """
    probe = [{"role": "user", "content": "probe"}]
    try:
        with_tools = render(tokenizer, probe, schemas, generation_prompt=True)
    except Exception as err:  # a template that fails on tools says so itself
        raise TemplateError(f"the chat template of {tokenizer.name_or_path!r} cannot render tools: {err}") from err
    if with_tools == render(tokenizer, probe, None, generation_prompt=True):
        raise TemplateError(
            f"the chat template of {tokenizer.name_or_path!r} ignores tools (a conversation renders the same with "
            "and without them), so the policy would never see the tools of rollout.multi_turn.tools: use a "
            "tokenizer whose template renders tools (e.g. Qwen2.5's, Llama 3.1's) or an environment instead"
        )
