"""One rank of a two-process DDP PPO fit with vLLM engines (torchrun, gloo, CPU): one engine per
rank, or with ``--tensor-parallel 2`` one engine sharded over both ranks.

python ddp_worker.py --assets DIR --out PREFIX [--tensor-parallel 2]   (writes PREFIX.<rank>.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lit_rlhf.rollout import VLLMEngine  # noqa: E402
from tests.helpers import datamodule, small_module  # noqa: E402


class Record(L.Callback):
    """After each epoch's training: is this rank's engine up, and how far were its log-probs from the trainer's?"""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        engine = pl_module.rollout.engine
        parallel = engine.llm.llm_engine.vllm_config.parallel_config
        self.epochs.append(
            {
                "engine_running": engine.llm is not None,
                "engine_tensor_parallel": parallel.tensor_parallel_size,
                "engine_in_this_process": os.getpid() in _worker_pids(),
                "logprob_abs_diff_max": float(trainer.callback_metrics["rollout/logprob_abs_diff_max"]),
                "weight_sync_s": float(trainer.callback_metrics["perf/weight_sync_s"]),
            }
        )


def _worker_pids() -> set[int]:
    """Processes that hold a vLLM worker: this one (external launcher) or spawned engine processes."""
    import vllm.distributed.parallel_state as state

    return {os.getpid()} if state.model_parallel_is_initialized() else set()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--assets", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    args = parser.parse_args()
    paths = {
        "policy": f"{args.assets}/policy",
        "prompts": f"{args.assets}/prompts.jsonl",
        "val_prompts": f"{args.assets}/val_prompts.jsonl",
    }
    engine = VLLMEngine(kv_cache_gib=0.25, max_num_seqs=64, tensor_parallel_size=args.tensor_parallel)
    module = small_module(paths, rollout={"engine": engine})
    record = Record()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[record],
        logger=False,
        default_root_dir=os.path.dirname(args.out),  # samples and the export go there
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule(paths))
    weights = torch.cat([p.detach().flatten() for p in module.actor.parameters()])
    result = {
        "rank": trainer.global_rank,
        "pid": os.getpid(),
        "epochs": record.epochs,
        "engine_after_fit": engine.llm is not None,
        "actor_sum": weights.double().sum().item(),
        "actor_abs_sum": weights.double().abs().sum().item(),
    }
    with open(f"{args.out}.{trainer.global_rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
