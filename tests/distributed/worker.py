"""Distributed checks, launched by tests/distributed/test_distributed.py (torchrun, gloo, CPU).

python worker.py train --strategy single|ddp|fsdp --assets DIR --out FILE
python worker.py stats --out FILE
python worker.py dpo --strategy single|ddp|fsdp --assets DIR --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lit_rlhf import functional as F  # noqa: E402
from lit_rlhf.models.sharding import full_state_dict  # noqa: E402
from lit_rlhf.rollout.advantages import global_whiten  # noqa: E402
from lit_rlhf.rollout.experience import Experience  # noqa: E402
from lit_rlhf.rollout.metrics import rollout_metrics  # noqa: E402
from lit_rlhf.rollout.runner import Rollout, RolloutRunner  # noqa: E402
from tests.helpers import SevensPPO, datamodule  # noqa: E402

ROWS = 8


def quiet_trainer(strategy_name: str, world: int, **stop) -> L.Trainer:
    """A CPU Trainer for ``single`` / ``ddp`` / ``fsdp`` (FSDP2) on ``world`` ranks, without logging,
    checkpoints or validation; ``stop`` is ``max_epochs`` or ``max_steps``."""
    strategy = {"single": "auto", "ddp": "ddp"}.get(strategy_name)
    if strategy_name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    return L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **stop,
    )


def fixed_experience(module) -> Experience:
    """8 experiences of different lengths, identical on every rank (seeded), whose prompts share their
    first 40 tokens (a system prompt: the shared prefix runs once, ``lit_rlhf.models.padding``)."""
    actor, critic = module.actor, module.critic
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 14, (1, 40), generator=g).expand(ROWS, -1)
    prompts = torch.cat([shared, torch.randint(3, 14, (ROWS, 6), generator=g)], 1)
    responses = torch.randint(3, 14, (ROWS, 5), generator=g)
    sequences = torch.cat([prompts, responses], 1)
    loss_mask = torch.arange(5) < torch.tensor([1, 5, 2, 4, 3, 5, 1, 2]).unsqueeze(1)
    attention_mask = torch.cat([torch.ones_like(prompts), loss_mask.long()], 1)
    with torch.no_grad():
        old = actor(sequences, attention_mask, 5)
        values = critic(sequences, attention_mask, 5)
    advantages = F.masked_whiten(torch.randn(ROWS, 5, generator=g), loss_mask) * loss_mask
    zeros = torch.zeros(ROWS, 5)
    return Experience(
        sequences=sequences,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        old_log_probs=old,
        rollout_log_probs=old,
        ref_log_probs=old - 0.01 * torch.rand(ROWS, 5, generator=g),
        values=values,
        rewards=zeros,
        advantages=advantages,
        returns=values + advantages,
        scores=torch.zeros(ROWS),
        kl=zeros,
        rollout_id=torch.zeros(ROWS, dtype=torch.long),
    )


def train(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    per_rank = ROWS // world
    module = SevensPPO(
        models={"actor_path": f"{args.assets}/policy", "critic_path": f"{args.assets}/reward"},
        generation={"max_new_tokens": 5},
        rollout={"rollout_batch_size": per_rank, "score_micro_batch_size": per_rank},
        algorithm={"mini_batch_size": per_rank, "micro_batch_size": 2, "ppo_epochs": 1},
        optim={
            "actor": {"optimizer": lambda p: torch.optim.SGD(p, lr=0.5), "max_grad_norm": None},
            "critic": {"optimizer": lambda p: torch.optim.SGD(p, lr=0.5), "max_grad_norm": None},
        },
    )

    def fixed_rollout(runner, rollout_index, prompts, progress=None):
        experience = fixed_experience(module)
        timing = {"generation_s": 0.0, "scoring_s": 0.0, "advantages_s": 0.0, "generated_tokens": 1.0}
        return Rollout(experience.index(slice(rank * per_rank, (rank + 1) * per_rank)), {}, timing)

    RolloutRunner.collect = fixed_rollout
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(args.strategy, world, max_epochs=1)
    assets = {"prompts": f"{args.assets}/prompts.jsonl", "val_prompts": f"{args.assets}/val_prompts.jsonl"}
    trainer.fit(module, datamodule=datamodule(assets))
    state = {f"actor.{k}": v for k, v in full_state_dict(module.actor.model).items()}
    state.update({f"critic.{k}": v for k, v in full_state_dict(module.critic.model).items()})
    # log-probs of the (possibly sharded) trained actor, and its single-checkpoint export
    sequences = fixed_experience(module).sequences[:2]
    with torch.no_grad():
        state["log_probs"] = module.actor(sequences, torch.ones_like(sequences), 5)
    module.export_pretrained(f"{args.out}.export")
    if trainer.is_global_zero:
        torch.save(state, args.out)
    finish()


def stats(args) -> None:
    """Two ranks with half the rows each reduce to the single-process statistics."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    values, mask = torch.randn(8, 6, generator=g), torch.rand(8, 6, generator=g) > 0.3
    mask[:, 0] = True
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)

    def all_reduce(x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    whitened = global_whiten(values[rows], mask[rows], all_reduce)
    gathered = [torch.zeros_like(whitened) for _ in range(world)]
    dist.all_gather(gathered, whitened)
    scores = torch.randn(8, generator=g)
    scores[3], scores[6:] = scores[2], 0.3  # of the pairs (0,1) (2,3) (4,5) (6,7), two scored alike
    exp = Experience(
        sequences=torch.randint(3, 14, (8, 10), generator=g),
        attention_mask=torch.ones(8, 10, dtype=torch.long),
        loss_mask=mask,
        old_log_probs=values,
        rollout_log_probs=values,
        ref_log_probs=values * 0.5,
        values=values,
        rewards=values,
        advantages=values,
        returns=values,
        scores=scores,
        kl=values,
        rollout_id=torch.zeros(8, dtype=torch.long),
    )
    eos = torch.tensor([2])
    distributed = rollout_metrics(exp.index(rows), {}, eos, all_reduce, group_size=2)
    single = rollout_metrics(exp, {}, eos, group_size=2)
    if rank == 0:
        result = {
            "whiten_max_diff": (torch.cat(gathered) - F.masked_whiten(values, mask)).abs().max().item(),
            "metrics_max_diff": max(abs(distributed[k].item() - single[k].item()) for k in single),
            "zero_std_fraction": distributed["reward/zero_std_fraction"].item(),
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def dpo_train(args) -> None:
    """One DPO step on 8 fixed pairs: one process with all of them, or two ranks with 4 each (DDP, FSDP2).

    The reference is a separate frozen copy whose log-probs are cached before the step (the ranks
    split that pass and all-gather it); the trained policy is exported at the end of ``fit``.
    """
    from lit_rlhf import DPOModule, PreferenceDataModule
    from lit_rlhf.tasks.arithmetic import preference_records, split_problems, write_jsonl

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    pairs = f"{args.out}.pairs.{rank}.jsonl"  # the same 8 pairs on every rank
    write_jsonl(pairs, preference_records(split_problems(0)["train"], ROWS, seed=0))
    module = DPOModule(
        models={"path": f"{args.assets}/policy"},
        optim={"optimizer": lambda p: torch.optim.SGD(p, lr=0.5), "max_grad_norm": None},
        export_dir=f"{args.out}.export",
    )
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(args.strategy, world, max_steps=1)
    trainer.fit(module, datamodule=PreferenceDataModule(pairs, batch_size=ROWS // world))
    state = {f"actor.{k}": v for k, v in full_state_dict(module.actor.model).items()}
    state["cached_rows"] = torch.tensor(len(module.reference_cache))
    if trainer.is_global_zero:
        torch.save(state, args.out)
    finish()


def finish() -> None:
    """Leave together: no rank exits (tearing down its gloo threads) while another still works, which
    aborted a rank now and then (``terminate called without an active exception``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "stats", "dpo"])
    parser.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp"])
    parser.add_argument("--assets")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    {"train": train, "stats": stats, "dpo": dpo_train}[args.mode](args)
