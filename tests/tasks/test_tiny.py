"""The offline tiny-model kit: tokenizers with fixed special ids, chat template, saved models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lit_rlhf.tasks import save_tiny_models, tiny_llama_config, train_tokenizer


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_special_ids_round_trip_and_template(kind, tmp_path):
    corpus = [f"Q: {a}+{b}=? A: {a + b}" for a in range(50) for b in range(20)]
    tok = train_tokenizer(corpus, kind=kind, vocab_size=300)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    if kind == "bpe":
        assert len(tok) == 300
    else:
        assert len(tok) == 3 + len(set("".join(corpus)))
    text = "Q: 12+7=? A: 19"
    assert tok.decode(tok(text).input_ids) == text
    chat = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<bos>3+4=7<eos>"
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text).input_ids == tok(text).input_ids


def test_tokenizer_needs_a_corpus():
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([])


def test_saved_tiny_models_load_with_plain_transformers(tmp_path, tokenizer):
    config = tiny_llama_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    paths = save_tiny_models(str(tmp_path), tokenizer, config, seed=3)
    lm = AutoModelForCausalLM.from_pretrained(paths["policy"])
    rm = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    assert lm.config.vocab_size == len(tokenizer) and lm.config.hidden_size == 32
    assert rm.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(paths["policy"]).eos_token_id == tokenizer.eos_token_id
    again = save_tiny_models(str(tmp_path / "again"), tokenizer, config, seed=3)
    same = AutoModelForCausalLM.from_pretrained(again["policy"])
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), same.state_dict().values(), strict=True))
