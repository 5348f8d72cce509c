"""PPO's actor and critic each follow their own ``optim`` schedule over the run's optimizer steps."""

import math

import lightning as L
import pandas as pd
import pytest
import torch

from tests.helpers import datamodule, small_module, trainer


def test_actor_and_critic_follow_their_schedules_over_the_whole_run(tiny_assets, tmp_path):
    # 16 rows, mini-batches of 8, 2 PPO epochs: 4 optimizer steps per rollout, 2 rollouts = 8 steps each
    optim = {
        "actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3), "lr_scheduler": "linear", "warmup_ratio": 0.25},
        "critic": {"optimizer": lambda p: torch.optim.AdamW(p, lr=2e-3), "lr_scheduler": "cosine"},
    }
    module = small_module(tiny_assets, optim=optim)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, 2)
    t.fit(module, datamodule=datamodule(tiny_assets))
    frame = pd.read_csv(f"{t.logger.log_dir}/metrics.csv")
    actor, critic = frame["policy/lr"].dropna().tolist(), frame["critic/lr"].dropna().tolist()
    # warmup_ratio 0.25 of 8 steps = 2 warm-up steps (s/2), then linear to 0 at step 8
    assert actor == pytest.approx([1e-3 * m for m in [0, 0.5] + [(8 - s) / 6 for s in range(2, 8)]], abs=1e-9)
    assert critic == pytest.approx([2e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)], abs=1e-9)


def test_max_steps_bounds_the_schedule_of_each_optimizer(tiny_assets, tmp_path):
    # max_steps counts both optimizers' steps: 6 = 3 actor steps, so the linear decay ends at step 3
    optim = {"actor": {"lr_scheduler": "linear"}, "critic": {"lr_scheduler": "linear"}}
    module = small_module(tiny_assets, optim=optim)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, -1, max_steps=6)
    t.fit(module, datamodule=datamodule(tiny_assets))
    frame = pd.read_csv(f"{t.logger.log_dir}/metrics.csv")
    actor = frame["policy/lr"].dropna().tolist()
    assert actor == pytest.approx([1e-6 * (3 - s) / 3 for s in range(3)], rel=1e-6)  # logged in float32
