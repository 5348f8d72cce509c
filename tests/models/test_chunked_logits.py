"""Log-probs and entropy from hidden states, the output layer a chunk of tokens at a time: the values and
gradients of the full logits, in every scoring and training forward (plain, packed, shared prefix)."""

import pytest
import torch

import lit_rlhf.functional.ppo as ppo
from lit_rlhf.functional import entropy_from_logits, log_probs_from_hidden, log_probs_from_logits
from lit_rlhf.models import Actor
from lit_rlhf.tasks import build_causal_lm, chat_tokenizer, qwen2_config


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("chatml", ["What is 2+3? #### 5 \\boxed{5} so the answer is"] * 50)


def actor_of(tok, padding_free=False):
    model = build_causal_lm(qwen2_config(tok, scale=16))
    return Actor(model, [tok.eos_token_id], tok.pad_token_id, padding_free=padding_free)


def batch(tok, shared_prefix=False):
    torch.manual_seed(0)
    seq = torch.randint(3, len(tok), (4, 20))
    if shared_prefix:  # every row starts with the same tokens (a system prompt)
        seq[:, :10] = seq[0, :10]
    mask = torch.ones_like(seq)
    mask[1, :2] = 0  # left padding
    mask[2, -3:] = 0  # a response that ended early
    seq[mask == 0] = tok.pad_token_id
    return seq, mask


def run(actor, seq, mask, chunked, entropy_grad=True):
    actor.chunked_logits = chunked
    actor.model.zero_grad()
    out = actor.log_probs_and_entropy(seq, mask, 8, 0.7, entropy_grad=entropy_grad)
    valid = mask[:, -8:].bool()
    loss = (out.log_probs * valid).sum() + 0.3 * (out.entropy * valid).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in actor.model.named_parameters() if p.grad is not None}
    return out.log_probs.detach() * valid, out.entropy.detach() * valid, grads


@pytest.mark.parametrize("path", ["plain", "packed", "shared_prefix"])
def test_chunked_values_and_gradients_equal_the_full_logits(tok, monkeypatch, path):
    tolerance = 1e-6  # fp32 (both compute the logits in fp32)
    actor = actor_of(tok, padding_free=path == "packed")
    seq, mask = batch(tok, shared_prefix=path == "shared_prefix")
    full = run(actor, seq, mask, chunked=False)
    calls = []
    monkeypatch.setattr(ppo, "LOGIT_CHUNK_ELEMENTS", 5 * len(tok))  # 5 tokens per chunk: 7 chunks of 32
    real = ppo._chunk_log_probs
    monkeypatch.setattr(ppo, "_chunk_log_probs", lambda h, *a: calls.append(h.shape[0]) or real(h, *a))
    chunked = run(actor, seq, mask, chunked=True)
    assert calls and max(calls) == 5, "no more than 5 tokens' logits at once"
    for a, b in zip(full[:2], chunked[:2], strict=True):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)
    assert full[2].keys() == chunked[2].keys()
    for name, grad in full[2].items():
        scale = float(grad.abs().max()) + 1.0
        torch.testing.assert_close(chunked[2][name], grad, rtol=tolerance, atol=tolerance * scale, msg=name)


def test_scoring_without_gradients_and_the_entropy_outside_the_graph(tok):
    actor = actor_of(tok)
    seq, mask = batch(tok)
    with torch.no_grad():
        actor.chunked_logits = False
        full = actor(seq, mask, 8)
        actor.chunked_logits = True
        chunked = actor(seq, mask, 8)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    out = actor.log_probs_and_entropy(seq, mask, 8, entropy_grad=False)
    assert out.log_probs.requires_grad and not out.entropy.requires_grad


def test_log_probs_from_hidden_against_the_formula():
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64), None
    labels = torch.randint(0, 50, (3, 7))
    logits = hidden @ weight.T
    lp, ent = log_probs_from_hidden(hidden, weight, bias, labels, 1.3, entropy=True, chunk_elements=50 * 4)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, log_probs_from_logits(logits, labels, 1.3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, entropy_from_logits(logits, 1.3), rtol=1e-6, atol=1e-6)
    p = torch.softmax(logits / 1.3, -1)
    torch.testing.assert_close(ent.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)
    picked = torch.log_softmax(logits / 1.3, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.double(), picked, rtol=1e-5, atol=1e-5)


def test_only_plain_output_layers_run_apart(tok):
    actor = actor_of(tok)
    assert actor.chunked_head() is actor.model.lm_head
    actor.chunked_logits = False
    assert actor.chunked_head() is None
    actor.chunked_logits = True
    actor.model.config.model_type = "gemma2"  # soft-caps its logits after the output layer
    assert actor.chunked_head() is None
