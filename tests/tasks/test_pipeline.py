"""The embedded pipeline, reduced: data -> SFT -> reward model -> PPO, through the real modules."""

import lightning as L
import pandas as pd
import pytest
import torch

from lit_rlhf import (
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModelModule,
    SFTDataModule,
    SFTModule,
)
from lit_rlhf.rewards import RewardModel
from lit_rlhf.tasks import arithmetic
from lit_rlhf.tasks.demo import evaluate, prepare


def fit(module, datamodule, root, **trainer_args):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(str(root)),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_args,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")


def test_arithmetic_task_pieces():
    assert arithmetic.solve("07+45=") == "52" and arithmetic.solve("83-26=") == "57"
    assert len(arithmetic.all_problems()) == 15_050
    splits = arithmetic.split_problems(0)
    assert not set(splits["test"]) & set(splits["train"]) and not set(splits["ppo"]) & set(splits["train"])
    torch.testing.assert_close(
        arithmetic.exact_match_reward(["07+45=", "07+45=", "10-01="], [" 52", "53", "9"], answer=["52", "52", 9]),
        torch.tensor([1.0, 0, 1]),
    )
    import random

    rng = random.Random(0)
    wrong = [arithmetic.wrong_answer("99+99=", rng) for _ in range(200)]
    assert "198" not in wrong and all(w.isdigit() for w in wrong)
    records = arithmetic.sft_records(splits["train"], 1000, 0.3, 0)
    noisy = sum(r["response"] != arithmetic.solve(r["prompt"]) for r in records) / 1000
    assert 0.25 < noisy < 0.35


@pytest.mark.slow
def test_reduced_pipeline_sft_then_reward_model_then_ppo(tmp_path):
    assets = tmp_path / "assets"
    prepare(str(assets), sft_size=8192, pairs=4096)
    # 1. SFT: loss falls, the exported policy loads
    sft = SFTModule(
        models={"path": str(assets / "base")},
        optim={
            "optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.95)),
            "warmup_steps": 10,
            "max_grad_norm": None,
        },
        export_dir=str(assets / "sft"),
    )
    _, sft_log = fit(
        sft,
        SFTDataModule(str(assets / "sft.jsonl"), val_path=str(assets / "sft_val.jsonl"), batch_size=128, max_length=16),
        tmp_path / "sft",
        max_steps=250,
        val_check_interval=250,
        check_val_every_n_epoch=None,
        log_every_n_steps=10,
    )
    losses = sft_log["sft/loss"].dropna().tolist()
    assert losses[-1] < 0.6 * losses[0], losses
    # 2. reward model from the SFT weights: held-out pairwise accuracy well above chance
    rm = RewardModelModule(
        models={"path": str(assets / "sft")},
        optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-4), "max_grad_norm": None},
        export_dir=str(assets / "rm"),
    )
    _, rm_log = fit(
        rm,
        PreferenceDataModule(
            str(assets / "pairs.jsonl"), val_path=str(assets / "pairs_val.jsonl"), batch_size=64, max_length=16
        ),
        tmp_path / "rm",
        max_steps=200,
        val_check_interval=200,
        check_val_every_n_epoch=None,
        log_every_n_steps=10,
    )
    accuracy = rm_log["val/accuracy"].dropna().iloc[-1]
    assert accuracy > 0.65, accuracy  # chance is 0.5
    # 3. PPO with the reward model: the reward rises
    ppo = PPOModule(
        models={"actor_path": str(assets / "sft")},
        rewards=[RewardModel(str(assets / "rm"))],
        generation={"max_new_tokens": 4},
        rollout={"rollout_batch_size": 256, "score_micro_batch_size": 256},
        algorithm={"mini_batch_size": 128, "micro_batch_size": 128, "ppo_epochs": 2},
        kl={"coef": 0.01},
        optim={
            "actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3)},
            "critic": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-4)},
        },
        val_metrics={"accuracy": "lit_rlhf.tasks.arithmetic.exact_match_reward"},
        export_dir=str(tmp_path / "ppo"),
    )
    prompts = PromptDataModule(
        str(assets / "prompts.jsonl"),
        val_path=str(assets / "val_prompts.jsonl"),
        apply_chat_template=True,
        val_batch_size=256,
    )
    _, ppo_log = fit(
        ppo, prompts, tmp_path / "ppo_logs", max_epochs=10, log_every_n_steps=1, check_val_every_n_epoch=10
    )
    rewards = ppo_log["reward/mean"].dropna().tolist()
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert "val/accuracy" in ppo_log and "val/kl" in ppo_log
    # 4. the report's evaluation runs on the exported policy
    before = evaluate(str(assets / "sft"), str(assets / "sft"), str(assets / "rm"), ["12+34=", "50-25="] * 8)
    after = evaluate(str(tmp_path / "ppo" / "actor"), str(assets / "sft"), str(assets / "rm"), ["12+34=", "50-25="] * 8)
    assert before["kl_to_reference"] == 0.0 and after["kl_to_reference"] > 0.0


def test_the_machine_a_timing_was_measured_on_is_described():
    from lit_rlhf.precision import native_bf16
    from lit_rlhf.tasks.machine import describe_machine, matmul_gflops

    rate = matmul_gflops(n=256, reps=3)
    assert 0 < rate["median"] <= rate["best"]
    machine = describe_machine()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["native_bf16"] == native_bf16("cpu") and machine["threads"] == torch.get_num_threads()
    assert machine["fp32_matmul_gflops"] > 0
