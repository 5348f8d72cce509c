"""The ``lit-rlhf`` command (same as ``python train.py``): LightningCLI plus an ``export`` subcommand.

lit-rlhf fit --config configs/ppo_tiny.yaml [--model.actor_path ...] [--ckpt_path last.ckpt]
lit-rlhf validate --config configs/ppo_tiny.yaml
lit-rlhf export --config configs/ppo_tiny.yaml --ckpt_path last.ckpt --export_dir out/ [--merge_lora false]
lit-rlhf serve-reward --reward_path DIR [--host 127.0.0.1 --port 8000]
"""

from __future__ import annotations

import argparse
import netrc
import os
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` to the log directory and records the full config in the logger (W&B)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class LitRLHFCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule (``class_path`` in the YAML), with W&B resume."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggerSaveConfigCallback,
            **kwargs,
        )

    def before_fit(self) -> None:
        """A run resumed with ``--ckpt_path`` keeps logging to the W&B run it started."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc") or not os.path.exists(ckpt_path):
            return
        metadata = os.path.join(ckpt_path, "meta.pt") if os.path.isdir(ckpt_path) else ckpt_path  # FSDP2: a folder
        run_id = torch.load(metadata, map_location="cpu", weights_only=False, mmap=True).get("wandb_run_id")
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and run_id and logger._experiment is None:
                logger._id = run_id
                logger._wandb_init.update(id=run_id, resume="allow")


def default_wandb_mode() -> None:
    """W&B runs offline unless the user set WANDB_MODE or is logged in (API key or netrc)."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


def export(args: list[str]) -> dict[str, str]:
    """``export``: load a checkpoint into the configured module and write Hugging Face checkpoints."""
    parser = argparse.ArgumentParser(prog="lit-rlhf export", add_help=False)
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint to export")
    parser.add_argument("--export_dir", required=True, help="output directory (actor/ and critic/ inside)")
    parser.add_argument("--merge_lora", default="true", choices=["true", "false"], help="merge LoRA into the weights")
    known, rest = parser.parse_known_args(args)
    if not os.path.exists(known.ckpt_path):
        raise FileNotFoundError(f"checkpoint {known.ckpt_path!r} does not exist")
    cli = LitRLHFCLI(args=rest, run=False)
    module = cli.model
    if not hasattr(module, "export_pretrained"):
        raise ValueError(f"{type(module).__name__} has no export_pretrained(); nothing to export")
    checkpoint = load_checkpoint(known.ckpt_path)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    paths = module.export_pretrained(known.export_dir, merge_lora=known.merge_lora == "true")
    for name, path in paths.items():
        print(f"exported {name} to {path}")
    return paths


def load_checkpoint(path: str) -> dict:
    """A whole checkpoint in CPU memory: a ``.ckpt`` file, or an FSDP2 (distributed) checkpoint folder."""
    if os.path.isdir(path):
        from pathlib import Path

        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(Path(path))
    return torch.load(path, map_location="cpu", weights_only=False)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    default_wandb_mode()
    if argv and argv[0] == "export":
        export(argv[1:])
        return
    if argv and argv[0] == "serve-reward":
        from lit_rlhf.rewards.server import serve

        serve(argv[1:])
        return
    LitRLHFCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
