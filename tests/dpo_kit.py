"""DPO test kit: a Trainer for the module tests, a fit that returns its metrics, a datamodule set up by hand."""

import lightning as L
import pandas as pd
import torch

from lit_rlhf import PreferenceDataModule

SGD = {"optimizer": lambda p: torch.optim.SGD(p, lr=0.5), "max_grad_norm": None}


def trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": L.pytorch.loggers.CSVLogger(str(tmp_path), name="logs"),
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def fit(module, data, tmp_path, **kwargs) -> pd.DataFrame:
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, **kwargs)
    t.fit(module, datamodule=data)
    return pd.read_csv(f"{t.logger.log_dir}/metrics.csv")


def attached(module, data: PreferenceDataModule) -> PreferenceDataModule:
    """A datamodule set up with the module's tokenizer, the way a Trainer does it."""
    t = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    t.strategy.connect(module)
    data.trainer = module.trainer = t
    data.setup("fit")
    module.configure_model()
    return data
