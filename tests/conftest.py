"""Shared fixtures: a locally trained tokenizer and tiny Llama models, nothing downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lit_rlhf.tasks import save_tiny_models, tiny_llama_config, train_tokenizer  # noqa: E402

CORPUS = [f"{a}+{b}={a + b}" for a in range(0, 100, 3) for b in range(0, 100, 7)]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, kind="char")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory, tokenizer) -> dict[str, str]:
    """``{"policy": dir, "reward": dir}`` of tiny saved models sharing the char tokenizer."""
    directory = tmp_path_factory.mktemp("tiny")
    config = tiny_llama_config(tokenizer, hidden_size=32, num_layers=2, num_heads=4)
    return save_tiny_models(str(directory), tokenizer, config, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, str]:
    """The arithmetic task's tiny assets (policy, reward model, prompt files), built once."""
    from lit_rlhf.tasks.assets import build_tiny_assets

    return build_tiny_assets(str(tmp_path_factory.mktemp("assets")), hidden_size=32, num_layers=1)
