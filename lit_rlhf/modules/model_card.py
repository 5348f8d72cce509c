"""The export's model card (``README.md``, written with ``huggingface_hub.ModelCard``) and its push to the Hub."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

import yaml

METHODS = {
    "ppo": "reinforcement learning from feedback (PPO family)",
    "sft": "supervised fine-tuning (SFT)",
    "reward": "reward modelling (Bradley-Terry on preference pairs)",
    "dpo": "direct preference optimisation (DPO)",
}
LAYOUTS = {
    "ppo": "`actor/` is the policy (a `*ForCausalLM` model); `critic/` is the value model (if the run had one).",
    "sft": "The folder is the fine-tuned `*ForCausalLM` model with its tokenizer.",
    "reward": "The folder is a `*ForSequenceClassification` reward model with its tokenizer.",
    "dpo": "The folder is the policy, a `*ForCausalLM` model with its tokenizer.",
}


def card_facts(module: Any, kind: str) -> dict[str, Any]:
    """What the card says about ``module``'s run: base model, method, settings, final metrics (when a Trainer
    ran it), and the command.
    """
    models = module.models
    method = METHODS.get(kind, kind)
    estimator = getattr(getattr(module, "algorithm", None), "advantage_estimator", None)
    if estimator is not None:  # PPO, GRPO, RLOO, ...: the estimator names the algorithm
        method += f", advantage estimator `{estimator}`"
    trainer = module._trainer
    metrics = {}
    if trainer is not None:
        for name, value in trainer.callback_metrics.items():
            metrics[name] = float(value.item() if hasattr(value, "item") else value)
    return {
        "kind": kind,
        "base_model": getattr(models, "actor_path", None) or getattr(models, "path", None),
        "method": method,
        "settings": {k: v for k, v in module.hparams.items() if not k.startswith("_")},
        "metrics": metrics,
        "command": run_command(),
    }


def run_command() -> str:
    """The command that ran this process, as a shell line (``lit-rlhf ...`` for the CLI)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program in ("lit-rlhf", "train.py"):
        return shlex.join(["lit-rlhf", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv]) + "  (Python API)"


def write_model_card(directory: str, kind: str, base_model: str | None, method: str, settings: dict,
                     metrics: dict[str, float], command: str) -> str:  # fmt: skip
    """Write ``<directory>/README.md``: Hub metadata (base model when it is a Hub id) and the run's facts."""
    from huggingface_hub import ModelCard, ModelCardData

    on_hub = base_model is not None and not os.path.exists(base_model)  # a local path is no Hub reference
    data = ModelCardData(
        base_model=base_model if on_hub else None,
        library_name="transformers",
        tags=["lit_rlhf", kind, *([] if kind == "reward" else ["text-generation"])],
    )
    lines = [f"# {kind.upper()} model trained with lit_rlhf", "", LAYOUTS.get(kind, ""), ""]
    lines += [f"- **Base model:** `{base_model}`", f"- **Method:** {method}", ""]
    lines += ["## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| `{k}` | {v:.6g} |" for k, v in sorted(metrics.items()))]
    else:
        lines += ["Not known (exported from a checkpoint outside a training run)."]
    lines += ["", "## Command", "", "```", command, "```", "", "## Settings", "", "```yaml"]
    lines += [yaml.safe_dump(settings, sort_keys=False, default_flow_style=False).rstrip(), "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = os.path.join(directory, "README.md")
    card.save(path)
    return path


def create_hub_repo(repo_id: str, private: bool = False) -> str:
    """Create (or find) the model repository ``repo_id`` on the Hub, before any work; returns its URL.

    Raises:
        RuntimeError: naming the repository and the fix (log in with ``hf auth login`` or set ``HF_TOKEN``).
    """
    from huggingface_hub import HfApi

    try:
        return str(HfApi().create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    except Exception as err:  # noqa: BLE001 - every way the Hub can refuse; the cause stays chained
        raise RuntimeError(
            f"--push_to_hub {repo_id!r}: the Hub repository cannot be created or reached ({type(err).__name__}: "
            f"{err}); log in (hf auth login or HF_TOKEN with write access) and check the name and HF_HUB_OFFLINE"
        ) from err


def push_to_hub(directory: str, repo_id: str, private: bool = False) -> str:
    """Upload the export folder ``directory`` to the model repository ``repo_id`` (created if missing).

    The export marker stays local. Returns the commit's URL.
    """
    from huggingface_hub import HfApi

    from lit_rlhf.modules.outputs import EXPORT_MARKER

    create_hub_repo(repo_id, private)
    commit = HfApi().upload_folder(
        repo_id=repo_id,
        folder_path=directory,
        repo_type="model",
        ignore_patterns=[EXPORT_MARKER, "*.partial", "*.old"],
        commit_message="Upload model exported with lit_rlhf",
    )
    return str(getattr(commit, "commit_url", commit))
