"""The sample table: rows spread over prompts, the user's turn as the prompt, and quiet when asked."""

from __future__ import annotations

import json
import re

import lightning as L
import pytest

from lit_rlhf import PPOModule, PromptDataModule, SampleLoggingCallback
from lit_rlhf.rollout import RolloutCallback
from lit_rlhf.rollout.samples import spread_rows, user_turn
from tests.helpers import datamodule, small_module, trainer

# a fit small enough for a CPU: P prompts x n samples per rollout, one PPO epoch per rollout
TINY = {
    "rollout": {"rollout_batch_size": 4, "score_micro_batch_size": 8},
    "algorithm": {"mini_batch_size": 8, "micro_batch_size": 8, "ppo_epochs": 1},
}


def read_samples(module: PPOModule) -> list[dict]:
    with open(f"{module.run_dir}/samples.jsonl") as f:
        return [json.loads(line) for line in f]


def test_spread_rows_takes_one_sample_of_each_prompt_before_the_second_ones():
    assert spread_rows(4, 8, 8) == [0, 8, 16, 24, 1, 9, 17, 25]
    assert spread_rows(16, 4, 8) == [0, 4, 8, 12, 16, 20, 24, 28], "more prompts than rows: one sample each"
    assert spread_rows(2, 3, 5) == [0, 3, 1, 4, 2]
    assert spread_rows(2, 2, 10) == [0, 2, 1, 3], "never more rows than the rollout has"
    assert spread_rows(3, 1, 2) == [0, 1]
    assert spread_rows(4, 8, 0) == []


def test_user_turn_is_the_last_user_message_or_the_raw_text():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Add 1 and 1."},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 and 2?"},
    ]
    assert user_turn(messages, "<|im_start|>system...") == "And 2 and 2?"
    assert user_turn(None, "1+2=") == "1+2="
    assert user_turn([{"role": "system", "content": "only a system turn"}], "rendered") == "rendered"


def test_conversational_samples_spread_over_prompts_and_show_the_users_message(chatml_assets, tmp_path):
    L.seed_everything(0, verbose=False)
    module = small_module(
        chatml_assets,
        generation={"max_new_tokens": 4, "n_samples_per_prompt": 4},
        log_samples_every_n_rollouts=1,
        num_logged_samples=8,
        **TINY,
    )
    data = PromptDataModule(chatml_assets["prompts"], field="messages", apply_chat_template=True, max_prompt_len=128)
    trainer(tmp_path, 1).fit(module, datamodule=data)
    rows = read_samples(module)
    assert len(rows) == 8 and {r["rollout"] for r in rows} == {0}
    assert [r["sample"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts[:4])) == 4, "the first four rows come from four prompts"
    assert prompts[4:] == prompts[:4], "then each prompt's second sample, in the same order"
    for row in rows:
        assert re.fullmatch(r"Add \d+ and \d+\.", row["prompt"]), row["prompt"]
        assert row["rendered_prompt"].startswith("<|im_start|>system\nbe brief<|im_end|>\n")
        assert f"<|im_start|>user\n{row['prompt']}<|im_end|>" in row["rendered_prompt"], "what the policy saw"
        assert {"response", "reward"} <= set(row)
    assert module.last_rollout is None, "the sample logger keeps no reference to the experience"


def test_every_second_rollout_logs_rollouts_zero_and_two_of_plain_prompts(tiny_assets, tmp_path, capsys):
    L.seed_everything(0, verbose=False)
    module = small_module(
        tiny_assets,
        generation={"max_new_tokens": 4, "n_samples_per_prompt": 2},
        log_samples_every_n_rollouts=2,
        num_logged_samples=3,
        **TINY,
    )
    trainer(tmp_path, 3).fit(module, datamodule=datamodule(tiny_assets))
    rows = read_samples(module)
    assert [r["rollout"] for r in rows] == [0, 0, 0, 2, 2, 2]
    assert [r["sample"] for r in rows] == [0, 0, 0] * 2, "three prompts, one sample each"
    for row in rows:  # raw text: no template, so what the policy saw is the prompt as written
        assert row["prompt"] == row["rendered_prompt"] and "<|" not in row["prompt"]
    out = capsys.readouterr().out
    assert "samples, rollout 0" in out and "samples, rollout 2" in out and "samples, rollout 1" not in out


def test_zero_logs_no_samples(tiny_assets, tmp_path, capsys):
    module = small_module(
        tiny_assets,
        generation={"max_new_tokens": 4, "n_samples_per_prompt": 2},
        log_samples_every_n_rollouts=0,
        num_logged_samples=8,
        **TINY,
    )
    trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))
    assert module.run_dir.startswith(str(tmp_path)) and not list(tmp_path.rglob("samples.jsonl"))
    assert "samples, rollout" not in capsys.readouterr().out


def test_negative_settings_are_errors_naming_the_setting(tiny_assets):
    with pytest.raises(ValueError, match="log_samples_every_n_rollouts must be >= 0"):
        small_module(tiny_assets, log_samples_every_n_rollouts=-1)
    with pytest.raises(ValueError, match="num_logged_samples must be >= 0"):
        small_module(tiny_assets, num_logged_samples=-2)
    with pytest.raises(ValueError, match="log_samples_every_n_rollouts"):
        SampleLoggingCallback(every_n_rollouts=-1)


def test_the_sample_logger_comes_after_the_rollout_callback(tiny_assets):
    module = small_module(tiny_assets, log_samples_every_n_rollouts=3, num_logged_samples=5)
    rollout, samples = module.configure_callbacks()
    assert isinstance(rollout, RolloutCallback) and isinstance(samples, SampleLoggingCallback)
    assert (samples.every_n_rollouts, samples.num_samples) == (3, 5)


def test_multi_turn_samples_make_a_wandb_table():
    """W&B types a table's column by its first row: messages whose keys differ (a tool message has a
    name) go in as their JSON text, so the table is built and nothing is lost."""
    import json

    import wandb

    from lit_rlhf.rollout.samples import table_value

    samples = [
        {"reward": 1.0, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {
            "reward": 0.0,
            "messages": [{"role": "assistant", "content": "c"}, {"role": "tool", "name": "f", "content": "r"}],
        },
    ]
    with pytest.raises(TypeError):
        wandb.Table(columns=["reward", "messages"], data=[list(s.values()) for s in samples])
    rows = [[table_value(v) for v in s.values()] for s in samples]
    table = wandb.Table(columns=["reward", "messages"], data=rows)
    assert [json.loads(r[1]) for r in table.data] == [s["messages"] for s in samples]
    assert [r[0] for r in table.data] == [1.0, 0.0]
