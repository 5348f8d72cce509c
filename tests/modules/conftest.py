"""Fixtures of the module tests: the embedded task's preference pairs and a second policy."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_rlhf.tasks.arithmetic import preference_records, split_problems, write_jsonl
from tests.helpers import SevensPPO, small_module


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, str]:
    """The embedded task's preference pairs: (prompt, right answer, wrong answer), as the demo writes them."""
    root = tmp_path_factory.mktemp("pairs")
    splits = split_problems(0)
    files = {name: str(root / f"{name}.jsonl") for name in ("train", "val", "small")}
    write_jsonl(files["train"], preference_records(splits["train"], 256, 2))
    write_jsonl(files["val"], preference_records(splits["dev"], 32, 3))
    write_jsonl(files["small"], preference_records(splits["train"], 64, 4))
    return files


@pytest.fixture(scope="module")
def other_policy(tiny_assets, tmp_path_factory) -> str:
    """A policy with the tiny assets' tokenizer and architecture but other weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["policy"])
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("other") / "policy")
    model.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_assets["policy"]).save_pretrained(path)
    return path


@pytest.fixture
def make(tiny_assets):
    """A small PPO module on the tiny assets (``module.assets`` keeps them for :func:`tests.helpers.fit`)."""

    def build(cls=SevensPPO, **overrides):
        module = small_module(tiny_assets, cls, **overrides)
        module.assets = tiny_assets
        return module

    return build
