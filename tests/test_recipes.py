"""The GPU recipes (configs/recipes/) run one step on CPU with a tiny model of the same architecture
(Qwen2) and chat template (ChatML), on data that ``lit-rlhf prepare`` wrote, and report their accuracy."""

import glob
import json
import os

import pytest
import yaml

from lit_rlhf.data.math_sets import prepare
from lit_rlhf.tasks import build_causal_lm, chat_tokenizer, qwen2_config
from tests.test_cli import ROOT, read_metrics

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml")))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny Qwen2 with a ChatML tokenizer, and GSM8K- and MATH-style prompt files prepared from local copies."""
    root = tmp_path_factory.mktemp("recipes")
    gsm8k = [
        {"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
        for a in range(1, 9)
        for b in range(1, 5)
    ]
    math = [
        {"problem": f"Compute ${a} \\cdot {b}$.", "solution": f"It is $\\boxed{{{a * b}}}$."}
        for a in range(1, 9)
        for b in range(1, 5)
    ]
    for name, rows in (("gsm8k", gsm8k), ("math", math)):
        copy = root / f"{name}_copy"
        copy.mkdir()
        for split, part in (("train", rows[:24]), ("test", rows[24:])):
            (copy / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        prepare(name, str(root / name), str(copy))
    corpus = [line for name in ("gsm8k", "math") for line in (root / name / "train.jsonl").read_text().splitlines()]
    tok = chat_tokenizer("chatml", corpus * 4, vocab_size=400, split_digits=True)
    model = build_causal_lm(qwen2_config(tok, scale=16))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    model.save_pretrained(root / "qwen2")
    tok.save_pretrained(root / "qwen2")
    return root


def recipe_overrides(recipe, kit, root) -> str:
    """A second --config: the tiny Qwen2 and the prepared data, a CPU, the native engine, small batches."""
    with open(recipe) as f:
        config = yaml.safe_load(f)
    data = "math" if "math" in config["data"]["init_args"]["path"] else "gsm8k"
    n = config["model"]["init_args"]["generation"]["n_samples_per_prompt"]
    override = {
        "trainer": {
            "accelerator": "cpu",
            "precision": "32-true",
            "max_epochs": 1,
            "check_val_every_n_epoch": 1,
            "limit_val_batches": 1,
            "logger": False,
            "default_root_dir": str(root),
        },
        "model": {
            "init_args": {
                "models": {"actor_path": str(kit / "qwen2")},
                "generation": {"max_new_tokens": 8},
                "rollout": {"engine": "native", "rollout_batch_size": 4, "score_micro_batch_size": 4 * n},
                "algorithm": {"mini_batch_size": 4 * n, "micro_batch_size": 2 * n},
            }
        },
        "data": {
            "init_args": {
                "path": str(kit / data / "train.jsonl"),
                "val_path": str(kit / data / "test.jsonl"),
                "max_prompt_len": 96,
                "val_batch_size": 8,
            }
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "override.yaml").write_text(yaml.safe_dump(override))
    return str(root / "override.yaml")


def test_there_are_the_three_recipes():
    names = [os.path.basename(r) for r in RECIPES]
    assert names == ["grpo_lora_gsm8k_qwen2.5-1.5b.yaml", "grpo_math_qwen2.5-1.5b.yaml", "ppo_gsm8k_qwen2.5-0.5b.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.basename(r) for r in RECIPES])
def test_a_recipe_runs_one_step_on_a_tiny_model_of_its_architecture_and_reports_accuracy(recipe, kit, tmp_path):
    from lit_rlhf.cli import LitRLHFCLI

    with open(recipe) as f:
        config = yaml.safe_load(f)["model"]["init_args"]
    root = tmp_path / "runs"
    cli = LitRLHFCLI(args=["fit", "--config", recipe, "--config", recipe_overrides(recipe, kit, root)])
    module = cli.model
    assert module.algorithm.advantage_estimator == config["algorithm"]["advantage_estimator"]
    assert module.models.lora.rank == config["models"].get("lora", {}).get("rank", 0)
    assert cli.trainer.current_epoch == 1 and module.global_step >= 1, "one rollout and its updates ran"
    metrics = read_metrics(root / "version_0")
    for name in config["val_metrics"]:
        values = metrics[f"val/{name}"].dropna()
        assert len(values) == 1 and 0.0 <= float(values.iloc[0]) <= 1.0
        # graded by the recipe's own reward on 8 held-out prompts: a multiple of 1/8
        assert float(values.iloc[0]) * 8 == pytest.approx(round(float(values.iloc[0]) * 8))
    reward = config["rewards"][0]["init_args"]["fn"].rsplit(".", 1)[1]
    assert metrics[f"reward/{reward}"].dropna().between(0.0, 1.0).all(), "the recipe's reward scored the rollout"
