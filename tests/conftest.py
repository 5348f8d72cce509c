"""Shared fixtures: a locally trained tokenizer and tiny Llama models, nothing downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: one thread each, in the runs they start too
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from lit_rlhf.tasks import save_tiny_models, tiny_llama_config, train_tokenizer  # noqa: E402

CORPUS = [f"{a}+{b}={a + b}" for a in range(0, 100, 3) for b in range(0, 100, 7)]


# files whose fixtures train a policy first: scheduled first, so that with ``pytest -n auto --dist
# loadfile`` (make test) the other worker runs the rest meanwhile instead of waiting at the end
HEAVY_FIRST = ("tests/tasks/test_tool_pipeline.py", "tests/tasks/test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keeps its order


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


@pytest.fixture(scope="session")
def chatml_assets(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama policy and reward model with a ChatML tokenizer, and a ``messages`` prompt file."""
    import json

    from lit_rlhf.tasks import chat_tokenizer

    directory = tmp_path_factory.mktemp("chatml")
    corpus = ["be brief", "What is 2+3?", "It is 5.", "Add 4 and 4.", "8", "system user assistant"] * 40
    tok = chat_tokenizer("chatml", corpus)
    config = tiny_llama_config(tok, hidden_size=32, num_layers=1, num_heads=4)
    paths = save_tiny_models(str(directory), tok, config, seed=0)
    records = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"Add {a} and {a}."}]}
        for a in range(64)
    ]
    paths["prompts"] = str(directory / "messages.jsonl")
    with open(paths["prompts"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return paths
