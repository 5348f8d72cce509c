"""A PPOModule fit and its validation with tools (the scripted engine): turns logged, conversations in
samples.jsonl, and held-out metrics read from whole trajectories."""

import json

import lightning as L
import pandas as pd
import pytest

from lit_rlhf import PPOModule, PromptDataModule
from lit_rlhf.rewards import RewardFunction
from lit_rlhf.rollout.multi_turn.loop import TurnLoop
from tests.helpers import trainer
from tests.rollout.scripted import ScriptedEngine, calculator, exact, questions_file

TOOL_CALL_RATE = "lit_rlhf.tasks.tool_use.tool_call_rate"


def test_a_ppo_fit_with_tools_logs_turns_and_writes_conversations_to_samples(kit, tmp_path):
    tok, paths = kit
    prompts = questions_file(tmp_path)
    module = PPOModule(
        models={"actor_path": paths["policy"], "critic_path": paths["reward"]},
        rewards=[RewardFunction(exact, name="exact")],
        generation={"max_new_tokens": 200},
        rollout={
            "engine": ScriptedEngine(tok),
            "weight_check_tolerance": None,
            "rollout_batch_size": 4,
            "multi_turn": {"tools": [calculator], "max_turns": 3},
        },
        algorithm={"mini_batch_size": 4, "micro_batch_size": 2},
        kl={"coef": 0.05},
        num_logged_samples=4,
    )
    L.seed_everything(0, verbose=False)
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(module, datamodule=PromptDataModule(str(prompts), field="messages", apply_chat_template=True))
    log = pd.read_csv(f"{fit.logger.log_dir}/metrics.csv")
    assert log["rollout/turns"].dropna().tolist() == [pytest.approx(7 / 4)] * 2
    assert log["tools/calculator/calls"].dropna().tolist() == [2.0, 2.0]
    assert log["policy/loss"].notna().sum() == 2 and log["critic/loss"].notna().sum() == 2
    with open(f"{module.run_dir}/samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    by_prompt = {s["prompt"]: s for s in samples if s["rollout"] == 0}
    good = by_prompt["What is 123*45?"]
    assert good["turns"] == 2 and good["tool_calls"] == 1 and good["response"].strip().endswith("5535")
    assert [m["role"] for m in good["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert "<tool_call>" in good["trained_text"] and "tool_response" not in good["trained_text"]


def test_validation_of_a_multi_turn_run_runs_the_tools_and_scores_the_final_answers(kit, tmp_path):
    """The held-out metrics of a tool run read whole trajectories: the final answers (all four right
    after their calls, errors included) and the conversations (three of four called a tool)."""

    tok, paths = kit
    prompts = questions_file(tmp_path)
    module = PPOModule(
        models={"actor_path": paths["policy"]},
        rewards=[RewardFunction(exact, name="exact")],
        generation={"max_new_tokens": 200, "n_samples_per_prompt": 2},
        rollout={
            "engine": ScriptedEngine(tok),
            "weight_check_tolerance": None,
            "rollout_batch_size": 4,
            "multi_turn": {"tools": [calculator]},
        },
        algorithm={"advantage_estimator": "grpo", "mini_batch_size": 8, "micro_batch_size": 8},
        kl={"coef": 0.0},
        val_metrics={
            "exact": "tests.rollout.scripted.exact",
            "tool_call_rate": "lit_rlhf.tasks.tool_use.tool_call_rate",
        },
        val_before_train=True,
    )
    # the validation samples with the actor's own sampler; here the scripted engine stands in for it
    module._val_turn_loop = TurnLoop(module.rollout.multi_turn, ScriptedEngine(tok), tok, module.val_generation)
    L.seed_everything(0, verbose=False)
    fit = trainer(tmp_path, max_epochs=1, check_val_every_n_epoch=1, limit_val_batches=None)
    data = PromptDataModule(str(prompts), val_path=str(prompts), field="messages", apply_chat_template=True)
    fit.fit(module, datamodule=data)
    log = pd.read_csv(f"{fit.logger.log_dir}/metrics.csv").dropna(subset=["val/exact"])
    assert len(log) == 2  # before training and after the epoch
    assert log["val/exact"].tolist() == [1.0, 1.0] and log["val/reward"].tolist() == [1.0, 1.0]
    assert log["val/tool_call_rate"].tolist() == [0.75, 0.75]
    assert module._val_turn_loop.engine.calls == [4, 3, 4, 3]  # two turns for the three rows that called
