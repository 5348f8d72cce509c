"""Offline tiny-model kit: a locally trained tokenizer and tiny Llama models built from config.

Nothing is downloaded; everything is saved with ``save_pretrained`` so the normal
``from_pretrained`` loading path is what tests and demos exercise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]

# A prompt is the user's text; the assistant's reply follows directly and ends with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


# Real-world templates (as Jinja strings) for tests of conversational data, with the special
# tokens :func:`chat_tokenizer` gives them.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# ChatML with tools in the Hermes/Qwen2.5 format: the tool schemas in the system turn, calls as
# <tool_call>{json}</tool_call> in the assistant's text, consecutive tool results in one user turn
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call functions. Their signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    '{{- \'\\n</tools>\\nCall one with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>\\n\' }}'
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_STYLES = {
    # style: (chat template, special tokens after <pad>, bos, eos)
    "chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "qwen_tools": (QWEN_TOOLS_TEMPLATE, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
}


def chat_tokenizer(
    style: Literal["chatml", "qwen_tools", "llama3"],
    corpus: Iterable[str],
    vocab_size: int = 512,
    split_digits: bool = False,
    merge_within: Literal["words", "lines"] = "words",
):
    """A byte-level BPE tokenizer with a real-world chat template and its special tokens.

    ``chatml``: ``<|im_start|>role\\n...<|im_end|>`` turns, EOS ``<|im_end|>``, no BOS (as Qwen).
    ``qwen_tools``: ChatML that renders tools (schemas in the system turn, tool results in a user
    turn, as Qwen2.5 does; calls are the assistant's ``<tool_call>`` text).
    ``llama3``: ``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`` turns after
    ``<|begin_of_text|>``, EOS ``<|eot_id|>`` (as Llama 3 Instruct). ``<pad>`` is id 0 in both.
    ``split_digits``: every digit its own token (as Qwen2 and Llama 3 pre-tokenize numbers).
    ``merge_within``: see :func:`train_tokenizer`.
    """
    template, specials, bos, eos = CHAT_STYLES[style]
    return train_tokenizer(
        corpus,
        "bpe",
        vocab_size,
        special_tokens=[PAD, *specials],
        bos=bos,
        eos=eos,
        chat_template=template,
        split_digits=split_digits,
        merge_within=merge_within,
    )


def train_tokenizer(
    corpus: Iterable[str],
    kind: Literal["char", "bpe"] = "bpe",
    vocab_size: int = 512,
    special_tokens: list[str] | None = None,
    bos: str | None = BOS,
    eos: str = EOS,
    chat_template: str = CHAT_TEMPLATE,
    split_digits: bool = False,
    merge_within: Literal["words", "lines"] = "words",
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``corpus``; by default ``<pad>``=0, ``<bos>``=1, ``<eos>``=2 and a chat template.

    Args:
        corpus: training texts.
        kind: ``char`` gives one token per character seen in the corpus; ``bpe`` a byte-level BPE.
        vocab_size: total vocabulary size for ``bpe`` (ignored for ``char``).
        special_tokens: the special tokens, first ids in order (default ``<pad>``, ``<bos>``, ``<eos>``).
        bos: the BOS token (None: none).
        eos: the EOS token.
        chat_template: the Jinja chat template.
        split_digits: ``bpe`` only: every digit its own token (no merge spans two digits).
        merge_within: ``bpe`` only: what a merge may span: a ``words`` piece (GPT-2's pre-split), or
            a whole ``lines`` piece, newlines apart (a text that recurs verbatim, like a system prompt,
            becomes a few tokens, as real tokenizers' large vocabularies make it).
    """
    texts = list(corpus)
    specials = special_tokens or SPECIAL_TOKENS
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    if kind == "char":
        chars = sorted({ch for text in texts for ch in text})
        vocab = {tok: i for i, tok in enumerate(specials + chars)}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
        tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=merge_within == "words")]
        if split_digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        if merge_within == "lines":
            steps.insert(0, pre_tokenizers.Split("\n", behavior="isolated"))
        tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid: char, bpe")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=[t for t in specials if t not in (PAD, bos, eos)],
        padding_side="left",
        chat_template=chat_template,
    )


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
) -> LlamaConfig:
    """A small Llama config whose special token ids match ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )


# Qwen2.5-0.5B-Instruct's shape (its config.json), for a model built without a download
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def qwen2_config(tokenizer: PreTrainedTokenizerFast | None = None, scale: int = 1, **overrides):
    """A ``Qwen2Config`` of Qwen2.5-0.5B-Instruct's architecture: its real shape (``scale=1``, no
    tokenizer: its 151,936-token vocabulary), or every width and the depth divided by ``scale`` with
    ``tokenizer``'s vocabulary and special ids (a tiny model of the same architecture)."""
    from transformers import Qwen2Config

    fields = dict(QWEN25_05B)
    if scale > 1:
        fields.update(
            hidden_size=max(fields["hidden_size"] // scale // 14 * 14, 28),
            intermediate_size=max(fields["intermediate_size"] // scale, 32),
            num_hidden_layers=max(fields["num_hidden_layers"] // scale, 1),
            max_position_embeddings=2048,
        )
    if tokenizer is not None:
        fields.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return Qwen2Config(**{**fields, **overrides})


def build_causal_lm(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised causal LM of ``config``'s architecture (seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def build_sequence_classifier(config: LlamaConfig, seed: int = 1) -> LlamaForSequenceClassification:
    """A randomly initialised scalar-head model (``num_labels=1``, seeded)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    config = LlamaConfig.from_dict({**fields, "num_labels": 1})
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def save_tiny_models(
    directory: str,
    tokenizer: PreTrainedTokenizerFast,
    config: LlamaConfig,
    seed: int = 0,
) -> dict[str, str]:
    """Save a tiny policy (``policy/``) and reward model (``reward/``), each with the tokenizer.

    Returns:
        ``{"policy": path, "reward": path}``.
    """
    paths = {"policy": f"{directory}/policy", "reward": f"{directory}/reward"}
    for name, model in (
        ("policy", build_causal_lm(config, seed)),
        ("reward", build_sequence_classifier(config, seed + 1)),
    ):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths
