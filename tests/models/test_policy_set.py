"""PolicySet: the model set PPO and DPO both own (actor, reference, critic), built, checked and used one way."""

import pytest
import torch

from lit_rlhf import DPOModule
from lit_rlhf.models import Actor, LoadSettings, LoraSettings, load_tokenizer
from lit_rlhf.models.policy_set import CriticSpec, PolicySet, drop_frozen, restore_frozen
from tests.helpers import small_module


@pytest.fixture
def tok(tiny_assets):
    return load_tokenizer(tiny_assets["policy"])


def sequences(tok):
    enc = tok(["12+34=46", "7+7=14"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_a_full_model_gets_a_frozen_reference_copy_and_a_critic(tiny_assets, tok):
    policy = PolicySet.build(
        LoadSettings(),
        tok,
        tiny_assets["policy"],
        actor_role="models.actor_path",
        critic=CriticSpec(tiny_assets["reward"], "models.critic_path"),
    )
    assert policy.reference is not None and policy.reference is not policy.actor and policy.has_reference
    assert not any(p.requires_grad for p in policy.reference.parameters()) and not policy.reference.training
    assert any(p.requires_grad for p in policy.actor.parameters()) and policy.critic is not None
    with torch.no_grad():
        for p in policy.actor.parameters():  # the actor moves on; the reference stays where it started
            p.add_(0.05 * torch.randn_like(p))
    ids, mask = sequences(tok)
    with torch.no_grad():
        expected = Actor.from_pretrained(tiny_assets["policy"], tok)(ids, mask, 3)
        torch.testing.assert_close(policy.reference_log_probs(ids, mask, 3, 1.0), expected)
        assert (policy.actor(ids, mask, 3) - expected).abs().max() > 1e-3
    assert policy.frozen_prefixes == ("reference.",)


def test_with_lora_the_reference_is_the_actor_with_its_adapter_disabled(tiny_assets, tok):
    load = LoadSettings(lora=LoraSettings(rank=4))
    policy = PolicySet.build(load, tok, tiny_assets["policy"], actor_role="models.path")
    assert policy.reference is None and policy.has_reference
    with torch.no_grad():
        for name, p in policy.actor.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids, mask = sequences(tok)
    with torch.no_grad():
        base = Actor.from_pretrained(tiny_assets["policy"], tok)(ids, mask, 3)
        torch.testing.assert_close(policy.reference_log_probs(ids, mask, 3, 1.0), base, atol=1e-6, rtol=1e-6)
        assert (policy.actor(ids, mask, 3) - base).abs().max() > 1e-3  # the adapter is back on after


def test_a_run_without_a_reference_term_builds_none(tiny_assets, tok):
    for load in (LoadSettings(), LoadSettings(lora=LoraSettings(rank=4))):
        policy = PolicySet.build(load, tok, tiny_assets["policy"], actor_role="models.path", uses_reference=False)
        assert policy.reference is None and not policy.has_reference


def test_another_tokenizer_is_refused_naming_the_role_and_the_fix(tiny_assets, chatml_assets, tok):
    others = {"models.reference_path": (chatml_assets["policy"], ": use the actor's tokenizer")}
    with pytest.raises(
        ValueError, match=r"models.reference_path would start from .* tokenizer differs.*actor's tokenizer"
    ):
        PolicySet.check_tokenizers(tok, others)
    PolicySet.check_tokenizers(tok, {"the critic": (tiny_assets["reward"], ""), "unused": (None, "")})


def test_frozen_weights_leave_a_checkpoint_and_come_back():
    state = {"actor.w": 1, "reference.w": 2, "rewards.0.w": 3}
    drop_frozen(state, ("reference.", "rewards."))
    assert state == {"actor.w": 1}
    restore_frozen(state, {"actor.w": 9, "reference.w": 2, "rewards.0.w": 3}, ("reference.", "rewards."))
    assert state == {"actor.w": 1, "reference.w": 2, "rewards.0.w": 3}


def test_ppo_and_dpo_each_own_one_model_set(tiny_assets):
    ppo = small_module(tiny_assets)
    ppo.configure_model()
    dpo = DPOModule(models={"path": tiny_assets["policy"]})
    dpo.configure_model()
    for module in (ppo, dpo):
        assert isinstance(module.policy, PolicySet)
        assert module.actor is module.policy.actor and module.reference is module.policy.reference
    assert ppo.critic is ppo.policy.critic and dpo.policy.critic is None
