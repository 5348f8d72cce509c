"""Model families the suite runs PPO on: tiny configs of each, one rollout and its updates."""

import lightning as L
import pytest
import torch
import transformers

from lit_rlhf import PPOModule
from lit_rlhf.rewards import RewardModel
from tests.helpers import datamodule, small_module, trainer

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gpt2": ("GPT2Config", {}),
}


def tiny_config(family: str, tokenizer):
    name, extra = FAMILIES[family]
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids, **extra
        )
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return getattr(transformers, name)(vocab_size=len(tokenizer), **sizes, **ids, **extra)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ppo_rollout_and_updates_on_each_family(family, tokenizer, tiny_assets, tmp_path):
    config = tiny_config(family, tokenizer)
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_config(config)
    config.num_labels = 1
    reward = transformers.AutoModelForSequenceClassification.from_config(config)
    paths = {"policy": str(tmp_path / "policy"), "reward": str(tmp_path / "reward")}
    for model, path in ((policy, paths["policy"]), (reward, paths["reward"])):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    assets = {**tiny_assets, **paths}
    module = small_module(assets, PPOModule, rewards=[RewardModel(paths["reward"])])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, 1).fit(module, datamodule=datamodule(assets))
    exp = module.buffer.experience
    assert torch.isfinite(exp.advantages).all() and torch.isfinite(exp.values).all()
    with torch.no_grad():  # the reference reproduces the rollout's policy: the first PPO ratio was 1
        reference = module.reference(exp.sequences, exp.attention_mask, exp.num_actions)
    torch.testing.assert_close(reference[exp.loss_mask], exp.ref_log_probs[exp.loss_mask], atol=1e-5, rtol=1e-5)
    after = module.actor.model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before), "the actor was updated"
