"""The ``lit-rlhf`` command (same as ``python train.py``): LightningCLI, ``export``, ``serve-reward``, ``prepare``.

lit-rlhf fit --config configs/ppo_tiny.yaml [--model.init_args.generation.max_new_tokens 8] [--ckpt_path ...]
lit-rlhf validate --config configs/ppo_tiny.yaml
lit-rlhf export --config configs/ppo_tiny.yaml --ckpt_path last.ckpt --export_dir out/ [--merge_lora false]
    [--push_to_hub REPO]
lit-rlhf serve-reward --reward_path DIR [--host 127.0.0.1 --port 8000]
lit-rlhf prepare gsm8k|math --out DIR [--from LOCAL_COPY]

Every run writes into one directory, ``<trainer.default_root_dir>/version_<N>`` (see
:func:`claim_run_directory`): config, metrics, W&B files, checkpoints, samples, plot and export.
"""

from __future__ import annotations

import argparse
import csv
import netrc
import os
import re
import shlex
import sys
from pathlib import Path

import lightning as L
import torch
from jsonargparse import set_parsing_settings
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

import lit_rlhf.data  # noqa: F401  (registers the datamodules, so `--data PromptDataModule` resolves)
import lit_rlhf.modules  # noqa: F401  (registers the modules, so `--model.help PPOModule` resolves)
from lit_rlhf.checkpoints import AtomicCheckpointIO, load_checkpoint_file, newest_checkpoint, verify_digest
from lit_rlhf.modules.model_card import create_hub_repo, push_to_hub
from lit_rlhf.modules.outputs import check_export_dir, checkpoint_outputs
from lit_rlhf.modules.ppo_setup import check_writable
from lit_rlhf.quiet import quiet
from lit_rlhf.signals import GracefulStop

RUN_DIR_ENV = "LIT_RLHF_RUN_DIR"
SETTINGS_POINTER = """lit-rlhf {subcommand} --config CONFIG [--trainer.FIELD VALUE] [--model.GROUP.FIELD VALUE] ...

The module's settings (its groups: models, rewards, generation, rollout, algorithm, kl, optim):
  lit-rlhf {subcommand} --model.help PPOModule      (and SFTModule, RewardModelModule, DPOModule)
  lit-rlhf {subcommand} --config CONFIG --print_config   (every setting of a config, with its value)
The data's settings: lit-rlhf {subcommand} --data.help PromptDataModule (SFTDataModule, PreferenceDataModule)
"""


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` to the run directory and records the full config in the loggers (W&B)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` (and ``hparams.yaml``) directly in the run directory, flushed at every step; a
    resumed run appends to it.

    (Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts.) Epochs that a resumed
    run does again after its checkpoint appear twice; plots average them.

    Args:
        save_dir: the run directory.
    """

    def __init__(self, save_dir: str) -> None:
        # written at every logging step: a killed run keeps its metrics up to the kill
        super().__init__(save_dir, name="", version="", flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class LitRLHFCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule (``class_path`` in the YAML), one run directory per run.

    Only ``fit`` and ``validate`` are offered (the modules define no test or predict step), and no
    ``--optimizer``/``--lr_scheduler`` (the modules configure their own from their ``optim`` group).
    """

    def __init__(self, *args, **kwargs) -> None:
        given = kwargs.get("args")
        self.argv = list(given) if isinstance(given, list | tuple) else sys.argv[1:] if given is None else None
        # each settings field's docstring is its --help line
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a resumed run rewrites its own config
        parser_kwargs = kwargs.pop("parser_kwargs", {})
        for subcommand in self.subcommands():
            parser_kwargs.setdefault(subcommand, {}).setdefault("usage", SETTINGS_POINTER.format(subcommand=subcommand))
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggerSaveConfigCallback,
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def _parse_ckpt_path(self) -> None:
        """Lightning's reading of the checkpoint's settings (weights-only); an unusable file is named."""
        try:
            super()._parse_ckpt_path()
        except Exception:
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            load_checkpoint_file(ckpt_path)  # raises the error that says what is wrong with the file
            raise

    def before_instantiate_classes(self) -> None:
        """Point every output of the run at its run directory (see :func:`claim_run_directory`).

        ``--ckpt_path last`` resumes from the newest complete checkpoint of the config's root
        (``<root>/version_<N>/checkpoints/last.ckpt``), or starts afresh when there is none.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            found = newest_checkpoint(Path(config.trainer.default_root_dir or "runs"))
            print(f"--ckpt_path last: {f'resuming from {found}' if found else 'no checkpoint yet, starting afresh'}")
            ckpt_path = config.ckpt_path = str(found) if found else None
        run_dir = claim_run_directory(config.trainer.default_root_dir, ckpt_path)
        config.trainer.default_root_dir = run_dir
        config.trainer.logger = run_loggers(config.trainer.logger, run_dir)
        for callback in config.trainer.callbacks or []:
            if callback.class_path.endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = os.path.join(run_dir, "checkpoints")

    def instantiate_classes(self) -> None:
        """Build the module, data and trainer, then claim the run directory: a setting that the module's
        own checks refuse leaves no run folder behind."""
        super().instantiate_classes()
        if self.subcommand and os.environ.get("LOCAL_RANK", "0") == "0":
            os.makedirs(self.trainer.default_root_dir, exist_ok=True)  # claims the version (W&B finds it)

    def before_fit(self) -> None:
        """A run resumed with ``--ckpt_path`` keeps logging to the W&B run it started."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc") or not os.path.exists(ckpt_path):
            return
        metadata = os.path.join(ckpt_path, "meta.pt") if os.path.isdir(ckpt_path) else ckpt_path  # FSDP2: a folder
        try:
            run_id = torch.load(metadata, map_location="cpu", weights_only=True, mmap=True).get("wandb_run_id")
        except Exception:  # noqa: BLE001 - let the safe loader say what is wrong with the file
            load_checkpoint_file(metadata)
            raise
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and run_id and logger._experiment is None:
                logger._id = run_id
                logger._wandb_init.update(id=run_id, resume="allow")

    def instantiate_trainer(self, **kwargs):
        from lit_rlhf.plot import PlotCallback

        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(PlotCallback())
        trainer.callbacks.append(GracefulStop(resume_command(self.argv)))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own CheckpointIO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def resume_command(argv: list[str] | None) -> str | None:
    """``lit-rlhf fit <the same arguments> --ckpt_path last``: what resumes a stopped ``fit`` (None otherwise)."""
    if not argv or argv[0] != "fit":
        return None
    kept, skip = [], False
    for arg in argv[1:]:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        skip = arg == "--ckpt_path"
        if not skip:
            kept.append(arg)
    return shlex.join(["lit-rlhf", "fit", *kept, "--ckpt_path", "last"])


def claim_run_directory(root: str | None, ckpt_path: str | None = None) -> str:
    """``<root>/version_<N>``: a fresh N, or the version a resumed checkpoint lives in.

    Processes that Lightning launches for the other ranks inherit the first one's choice (through
    ``LIT_RLHF_RUN_DIR``); with torchrun or SLURM, export ``LIT_RLHF_RUN_DIR`` for every rank.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    root_path = Path(root or "runs")
    resumed = _version_of(root_path, ckpt_path) if ckpt_path else None
    if resumed is not None:
        run_dir = root_path / resumed
    else:
        versions = [int(m.group(1)) for p in _children(root_path) if (m := re.fullmatch(r"version_(\d+)", p.name))]
        run_dir = root_path / f"version_{max(versions, default=-1) + 1}"
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return str(run_dir)


def _children(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def _version_of(root: Path, ckpt_path: str) -> str | None:
    """The name of the ``root/version_N`` directory that holds ``ckpt_path``, if any."""
    for parent in Path(ckpt_path).resolve().parents:
        if parent.parent == root.resolve() and re.fullmatch(r"version_\d+", parent.name):
            return parent.name
    return None


def run_loggers(loggers, run_dir: str) -> list:
    """The configured loggers writing into ``run_dir``, plus the CSV log every run keeps (for its plot).

    ``logger: false`` turns the logging services off, not ``metrics.csv``: the run still keeps it.
    """
    from jsonargparse import Namespace

    configured = [] if loggers in (None, True, False) else (loggers if isinstance(loggers, list) else [loggers])
    for logger in configured:
        if isinstance(logger, Namespace) and logger.init_args.get("save_dir") in (None, "."):
            logger.init_args.save_dir = run_dir
    if not any(str(getattr(logger, "class_path", "")).endswith("CSVLogger") for logger in configured):
        configured.append(Namespace(class_path="lit_rlhf.cli.RunCSVLogger", init_args=Namespace(save_dir=run_dir)))
    return configured


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


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-rlhf export",
        description="Load a checkpoint into the configured module and write Hugging Face checkpoints "
        "(PPO: actor/ and critic/; SFT, reward model, DPO: the model itself) with a model card (README.md). "
        "Every other option (--config, --model...) is the fit command's.",
        usage="lit-rlhf export --config CONFIG --ckpt_path CKPT --export_dir DIR [--merge_lora false] "
        "[--push_to_hub REPO [--hub_private]] [fit options]",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (file, or FSDP2 folder)")
    parser.add_argument(
        "--export_dir",
        required=True,
        help="output folder (PPO: actor/ and critic/ inside): new, empty, or an earlier export of the same kind",
    )
    parser.add_argument("--merge_lora", default="true", choices=["true", "false"], help="merge LoRA into the weights")
    parser.add_argument("--push_to_hub", metavar="REPO", help="then upload the folder to this Hub model repository")
    parser.add_argument("--hub_private", action="store_true", help="create the Hub repository as private")
    return parser


def export(args: list[str]) -> dict[str, str]:
    """``export``: load a checkpoint into the configured module and write Hugging Face checkpoints.

    Every check that needs no model runs first: the export folder may be written and replaced (it holds no run
    and nothing lit_rlhf did not write), the Hub repository exists, the checkpoint loads.
    """
    known, rest = export_parser().parse_known_args(args)
    check_writable({"--export_dir": known.export_dir})
    check_export_dir(known.export_dir, None, "--export_dir", checkpoint_outputs(known.ckpt_path))
    if known.push_to_hub:
        create_hub_repo(known.push_to_hub, known.hub_private)  # auth and name fail now, not after the export
    checkpoint = load_checkpoint(known.ckpt_path)  # a bad file fails here, before any model loads
    verify_digest(checkpoint, known.ckpt_path)
    cli = LitRLHFCLI(args=rest, run=False)
    module = cli.model
    if not hasattr(module, "export_pretrained"):
        raise ValueError(f"{type(module).__name__} has no export_pretrained(); nothing to export")
    check_export_dir(known.export_dir, getattr(module, "export_kind", None), "--export_dir")
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    paths = module.export_pretrained(known.export_dir, merge_lora=known.merge_lora == "true")
    for name, path in paths.items():
        print(f"exported {name} to {path}")
    if known.push_to_hub:
        print(f"pushed {known.export_dir} to {push_to_hub(known.export_dir, known.push_to_hub, known.hub_private)}")
    return paths


def load_checkpoint(path: str) -> dict:
    """A whole checkpoint in CPU memory: a ``.ckpt`` file, or an FSDP2 (distributed) checkpoint folder.

    Nothing in it can run code (``weights_only=True``); a bad file is an error naming it.
    """
    if os.path.isdir(path):
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(Path(path))
    return load_checkpoint_file(path)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    default_wandb_mode()
    quiet()
    if argv and argv[0] == "export":
        export(argv[1:])
        return
    if argv and argv[0] == "prepare":
        from lit_rlhf.data.math_sets import main as prepare

        prepare(argv[1:])
        return
    if argv and argv[0] == "serve-reward":
        from lit_rlhf.rewards.server import serve

        serve(argv[1:])
        return
    LitRLHFCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
