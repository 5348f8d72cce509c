"""PPOModule's bad input: rewards that return NaN or the wrong shape or raise, invalid settings, and
missing or empty prompt data, each a clear error (before any model loads where it is knowable)."""

import re

import pytest
import torch

from lit_rlhf import PPOModule
from lit_rlhf.models import GenerationOutput
from lit_rlhf.rewards import RewardError, RewardFunction, RewardModel
from tests.helpers import datamodule, fit, sevens_reward, trainer


class NaNReward(PPOModule):
    def compute_reward(self, prompts, responses):
        scores = torch.zeros(len(prompts))
        scores[3] = float("nan")
        return scores


class ShortReward(PPOModule):
    def compute_reward(self, prompts, responses):
        return torch.zeros(len(prompts) - 1)


class RaisingReward(PPOModule):
    def compute_reward(self, prompts, responses):
        raise KeyError("judge offline")


@pytest.mark.parametrize(
    "cls,message",
    [
        (NaNReward, r"reward NaNReward.compute_reward returned nan for sample 3 \(prompt '\d\d[+-]\d\d='"),
        (ShortReward, r"reward ShortReward.compute_reward returned shape \(15,\); expected \(16,\)"),
        (RaisingReward, r"reward RaisingReward.compute_reward raised KeyError"),
    ],
)
def test_bad_rewards_stop_the_run_with_a_clear_error(make, tmp_path, cls, message):
    with pytest.raises(RewardError, match=message):
        fit(tmp_path, make(cls), 1)


def test_reward_function_by_dotted_path(make, tmp_path):
    module = make(PPOModule, rewards=[RewardFunction("tests.helpers.sevens_reward")])
    fit(tmp_path, module, 1)
    exp = module.buffer.experience
    responses = module.decode_responses(
        GenerationOutput(exp.sequences, exp.attention_mask, exp.loss_mask, exp.old_log_probs, exp.scores > 0)
    )
    torch.testing.assert_close(exp.scores, sevens_reward([], responses))
    with pytest.raises(ValueError, match="cannot import RewardFunction.fn 'tests.helpers.nope'"):
        make(PPOModule, rewards=[RewardFunction("tests.helpers.nope")])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(algorithm={"advantage_estimator": "ppo2"}), "unknown algorithm.advantage_estimator 'ppo2'; valid: gae"),
        (dict(kl={"estimator": "k9"}), "unknown kl.estimator"),
        (dict(kl={"penalty": "loss", "estimator": "k1"}), "use k2 or k3"),
        (dict(algorithm={"advantage_estimator": "grpo"}), "generation.n_samples_per_prompt >= 2"),
        (
            dict(
                algorithm={"advantage_estimator": "grpo", "whiten_advantages": True},
                generation={"n_samples_per_prompt": 2},
            ),
            "whiten twice",
        ),
        (dict(algorithm={"mini_batch_size": 5, "micro_batch_size": 5}), "multiple of algorithm.mini_batch_size"),
        (dict(algorithm={"mini_batch_size": 8, "micro_batch_size": 3}), "multiple of algorithm.micro_batch_size"),
        (dict(models={"load_in_4bit": True}), "lora.rank > 0"),
        (dict(generation={"temperature": 0.0}), "temperature > 0"),
    ],
)
def test_invalid_settings_name_the_settings(make, overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_no_reward_source_is_an_error(tiny_assets):
    with pytest.raises(ValueError, match="no reward: add a component to rewards"):
        PPOModule(models={"actor_path": tiny_assets["policy"]})


def test_empty_prompt_file_fails_before_models_load(make, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    module = make()
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        trainer(tmp_path, 1).fit(module, datamodule=datamodule({"prompts": str(empty), "val_prompts": str(empty)}))
    assert module.actor is None, "no model may be loaded before the data is checked"


def test_missing_prompt_file_and_field(make, tmp_path):
    from lit_rlhf import PromptDataModule

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        trainer(tmp_path, 1).fit(make(), datamodule=PromptDataModule(str(tmp_path / "nope.jsonl")))
    records = tmp_path / "q.jsonl"
    records.write_text('{"question": "1+1="}\n')
    with pytest.raises(ValueError, match="q.jsonl, row 1, field 'prompt': the prompt field is missing"):
        trainer(tmp_path, 1).fit(make(), datamodule=PromptDataModule(str(records)))


def test_reward_model_returning_nan_names_the_sample(make, monkeypatch):
    module = make(PPOModule, rewards=[RewardModel(make().assets["reward"])])
    module.configure_model()
    sequences = torch.tensor([[1, 5, 4, 6, 7, 2], [1, 6, 4, 5, 8, 2]])
    gen = GenerationOutput(
        sequences,
        torch.ones_like(sequences),
        torch.ones(2, 2, dtype=torch.bool),
        torch.zeros(2, 2),
        torch.ones(2, dtype=torch.bool),
    )
    monkeypatch.setattr(
        module.rewards[0].model, "score", lambda s, m, normalize=False: torch.tensor([0.5, float("nan")])
    )
    response = module.decode_responses(gen)[1]
    with pytest.raises(
        RewardError,
        match=re.escape(f"reward reward_model returned nan for sample 1 (prompt 'q2', response '{response}')"),
    ):
        module.score_responses(gen, ["q1", "q2"], {})
