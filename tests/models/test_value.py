"""ValueModel: value/state alignment, score at the last valid token, normalisation, export."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lit_rlhf.models import LoadSettings, LoraSettings, ValueModel


@pytest.fixture
def critic(tiny_paths):
    return ValueModel.from_pretrained(tiny_paths["reward"])


def test_value_of_action_t_is_read_at_the_token_before_it(critic):
    # prompt [pad pad 1 5 4 6] + response [7 8 2]; the model is causal, so the head's output at
    # position i equals the score of the sequence cut right after position i.
    seq = torch.tensor([[0, 0, 1, 5, 4, 6, 7, 8, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    values = critic(seq, mask, num_actions=3)
    # action 0 (token 7, index 6) was chosen in the state ending at index 5 (token 6), etc.
    expected = torch.stack([critic.score(seq[:, :end], mask[:, :end]) for end in (6, 7, 8)], 1)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_score_is_read_at_last_valid_token_not_padding(critic):
    seq = torch.tensor([[0, 0, 1, 5, 4, 2, 0, 0], [1, 5, 4, 6, 7, 8, 9, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    scores = critic.score(seq, mask)
    alone = critic.score(torch.tensor([[1, 5, 4, 2]]), torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(scores[0], alone[0], atol=1e-5, rtol=1e-5)
    padded_score_at_wrong_token = critic.score(seq[:1], torch.ones(1, 8, dtype=torch.long))
    assert not torch.allclose(scores[0], padded_score_at_wrong_token[0], atol=1e-4)


def test_normalisation_and_round_trip(critic, tmp_path, tokenizer):
    seq = torch.tensor([[1, 5, 4, 6, 2]])
    mask = torch.ones_like(seq)
    raw = critic.score(seq, mask)
    critic.set_normalization(mean=0.5, std=2.0)
    torch.testing.assert_close(critic.score(seq, mask, normalize=True), (raw - 0.5) / 2.0)
    critic.save_pretrained(str(tmp_path), tokenizer=tokenizer)
    reloaded = ValueModel.from_pretrained(str(tmp_path))
    assert torch.equal(reloaded.score(seq, mask, normalize=True), critic.score(seq, mask, normalize=True))
    assert torch.equal(reloaded(seq, mask, 2), critic(seq, mask, 2))
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert plain.config.reward_std == 2.0
    with pytest.raises(ValueError, match="std"):
        critic.set_normalization(0.0, 0.0)


def test_causal_lm_checkpoint_gets_a_new_head_only_when_asked_and_keeps_backbone(tiny_paths):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="critic '.*policy' is a LlamaForCausalLM without the 'score' head"):
        ValueModel.from_pretrained(tiny_paths["policy"], role="critic")
    critic = ValueModel.from_pretrained(tiny_paths["policy"], new_head_ok=True)
    lm = AutoModelForCausalLM.from_pretrained(tiny_paths["policy"])
    torch.testing.assert_close(critic.model.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert critic.model.score.weight.shape == (1, lm.config.hidden_size)


def test_lora_critic_trains_adapter_and_head_only(tiny_paths):
    critic = ValueModel.from_pretrained(tiny_paths["reward"], LoadSettings(lora=LoraSettings(rank=4)))
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    seq = torch.tensor([[1, 5, 4, 6, 2]])
    assert critic(seq, torch.ones_like(seq), 2).shape == (1, 2)


def test_missing_path_is_named():
    with pytest.raises(FileNotFoundError, match="/does/not/exist"):
        ValueModel.from_pretrained("/does/not/exist")
