"""One check of ``python -m lit_rlhf.gpu_check``, in a process of its own (``--run-one NAME``): PPO/GRPO
iterations timed phase by phase, or one PPO step saved for the comparison across strategies; the
result goes to ``OUT/checks/NAME.json``."""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from typing import Any

from lit_rlhf.gpu_check import (
    BY_NAME,
    PROBE_TOLERANCE,
    STEP_ROWS,
    Check,
    Sizes,
    kit_dir,
    model_flops_per_token,
    sizes,
    varied_reward,
)


class Probe:
    """Times each iteration's phases and counts the tokens trained (a Lightning callback)."""

    def __init__(self, cuda: bool) -> None:
        import lightning as L

        class _Callback(L.Callback):
            def on_train_epoch_start(cb, trainer, module):  # before the rollout (the module's callback)
                self._sync()
                self.epoch_start, self.train_start, self.tokens = time.perf_counter(), None, 0

            def on_train_batch_start(cb, trainer, module, batch, batch_idx):
                if self.train_start is None:
                    self._sync()
                    self.train_start = time.perf_counter()
                self.tokens += int(module.buffer.get(batch).attention_mask.sum())

            def on_train_epoch_end(cb, trainer, module):
                self._sync()
                end = time.perf_counter()
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
                train_start = self.train_start or end
                self.iterations.append(
                    {
                        "seconds": end - self.epoch_start,
                        "rollout_s": train_start - self.epoch_start,
                        "train_s": end - train_start,
                        "train_tokens": self.tokens,
                        "metrics": metrics,
                    }
                )

        self.cuda = cuda
        self.callback = _Callback()
        self.iterations: list[dict] = []
        self.epoch_start = self.train_start = 0.0
        self.tokens = 0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def module_settings(check: Check, kit: str, size: Sizes, cuda: bool) -> dict:
    """The PPOModule's settings groups for ``check``."""
    from lit_rlhf.rewards import RewardFunction

    ppo = check.algorithm == "ppo"
    samples = 1 if ppo else size.samples
    prompts = size.prompts if ppo else size.prompts // size.samples
    engine: Any = "native"
    if check.engine == "vllm":
        from lit_rlhf.rollout import VLLMEngine

        engine = VLLMEngine(gpu_memory_utilization=0.25, max_model_len=512, kv_cache_gib=None if cuda else 0.25)
    models = {"actor_path": os.path.join(kit, "model"), **check.models}
    if ppo:
        models["new_value_head"] = True  # the critic starts from the policy, as in the PPO recipe
    return {
        "models": models,
        "log_samples_every_n_rollouts": 0,  # random weights: nothing to read
        "rewards": [RewardFunction(fn=varied_reward)],
        "generation": {"max_new_tokens": size.max_new_tokens, "temperature": 1.0, "n_samples_per_prompt": samples},
        "rollout": {"engine": engine, "rollout_batch_size": prompts, "score_micro_batch_size": size.micro_batch},
        "algorithm": {
            "advantage_estimator": "gae" if ppo else "grpo",
            **({"gamma": 1.0, "lam": 1.0, "value_clip_eps": 0.5} if ppo else {}),
            "ppo_epochs": 1,
            "mini_batch_size": size.mini_batch,
            "micro_batch_size": size.micro_batch,
        },
        "kl": {"coef": 0.001, "estimator": "k1", "penalty": "reward"}
        if ppo
        else {"coef": 0.001, "estimator": "k3", "penalty": "loss"},
    }


def trainer_for(check: Check, cuda: bool, devices: int, callbacks: list, out: str, **stop):
    """The check's trainer; its run directory (the export) is ``out/runs/<check>``, never the working one."""
    import lightning as L

    strategy: Any = "auto"
    if check.strategy == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        from lit_rlhf.models.sharding import decoder_layer_policy

        strategy = FSDPStrategy(auto_wrap_policy=decoder_layer_policy)
    elif check.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    precision = "32-true" if check.kind == "step" or not cuda else "bf16-mixed"
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=devices,
        strategy=strategy,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=run_dir(out, check),
        **stop,
    )


def run_dir(out: str, check: Check) -> str:
    return os.path.join(out, "runs", check.name)


def export_written(out: str, check: Check) -> bool:
    """Whether the run's export (actor/, with the critic for PPO) was written; it is then removed, so
    that the checks of a 0.5B model do not fill the disk."""
    path = os.path.join(run_dir(out, check), "export")
    written = os.path.isfile(os.path.join(path, "lit_rlhf_export.json")) and os.path.isdir(os.path.join(path, "actor"))
    shutil.rmtree(path, ignore_errors=True)
    return written


def run_iterations(check: Check, kit: str, size: Sizes, cuda: bool, out: str) -> dict:
    """``size.iterations`` PPO/GRPO iterations of ``check`` on one device; its numbers."""
    import lightning as L
    import torch

    from lit_rlhf import PPOModule, PromptDataModule

    L.seed_everything(0, verbose=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    probe = Probe(cuda)
    settings = module_settings(check, kit, size, cuda)
    module = PPOModule(
        **settings,
        optim={
            "actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-6), "max_grad_norm": 1.0},
            "critic": {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-5), "max_grad_norm": 1.0},
        },
    )
    data = PromptDataModule(os.path.join(kit, "prompts.jsonl"), apply_chat_template=True, max_prompt_len=256)
    trainer = trainer_for(check, cuda, 1, [probe.callback], out, max_epochs=size.iterations)
    trainer.fit(module, datamodule=data)
    measured = probe.iterations[1:] or probe.iterations
    flops_per_token, params = model_flops_per_token(os.path.join(kit, "model"), bool(check.models.get("lora")))
    if check.algorithm == "ppo":  # the critic: the same trunk, a value head instead of the output layer
        with open(os.path.join(kit, "model", "config.json")) as f:
            config = json.load(f)
        flops_per_token += 6.0 * (params - config["hidden_size"] * config["vocab_size"])
    train_s = sum(i["train_s"] for i in measured)
    train_tokens = sum(i["train_tokens"] for i in measured)
    last = measured[-1]["metrics"]
    numbers = {
        "iterations": len(probe.iterations),
        "s_per_iter": sum(i["seconds"] for i in measured) / len(measured),
        "rollout_s": sum(i["rollout_s"] for i in measured) / len(measured),
        "train_s": train_s / len(measured),
        "generation_tokens_per_s": sum(i["metrics"].get("perf/generation_tokens_per_s", 0.0) for i in measured)
        / len(measured),
        "train_tokens_per_s": train_tokens / max(train_s, 1e-9),
        "train_flops_per_token": flops_per_token,
        "actor_params": params,
        "peak_memory_gib": peak_memory_gib(cuda),
        "reward_mean": last.get("reward/mean"),
        "policy_loss": last.get("policy/loss"),
    }
    for key in ("perf/weight_sync_s", "rollout/weight_check_logprob_diff", "rollout/kl", "critic/loss"):
        if key in last:
            numbers[key.replace("critic/loss", "value_loss").split("/", 1)[-1]] = last[key]
    finite = all(v is None or v == v and abs(v) != float("inf") for v in numbers.values() if isinstance(v, float))
    problems = []
    if len(probe.iterations) != size.iterations:
        problems.append(f"{len(probe.iterations)} of {size.iterations} iterations ran")
    if not finite:
        problems.append("a non-finite number")
    if train_tokens == 0 or numbers["policy_loss"] is None:
        problems.append("no token was trained")
    if check.engine == "vllm" and "weight_sync_s" not in numbers:
        problems.append("no perf/weight_sync_s: the engine got no push")
    probe, tolerance = numbers.get("weight_check_logprob_diff"), PROBE_TOLERANCE["cuda" if cuda else "cpu"]
    if check.engine == "vllm" and (probe is None or probe > tolerance):
        problems.append(f"the engine's log-probs after a push are off by {probe} (> {tolerance})")
    return {"status": "fail" if problems else "pass", "reason": "; ".join(problems), "numbers": numbers}


def peak_memory_gib(cuda: bool) -> float:
    """Peak GPU memory allocated by this process, or on CPU its peak resident memory."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def step_devices(cuda: bool) -> int:
    """The ranks of the one-step comparison: the machine's GPUs, as many as divide ``STEP_ROWS`` (two
    CPU processes in the dry run)."""
    if not cuda:
        return 2
    import torch

    count = torch.cuda.device_count()
    return max(d for d in (1, 2, 4, 8, 16) if d <= count and STEP_ROWS % d == 0)


def run_step(check: Check, kit: str, size: Sizes, cuda: bool, out: str) -> dict:
    """One PPO optimizer step (SGD) on ``STEP_ROWS`` fixed experiences split over the ranks; each rank
    saves its rows' actor log-probs and critic values before and after, for the comparison."""
    import lightning as L
    import torch

    from lit_rlhf import PPOModule, PromptDataModule
    from lit_rlhf import functional as F
    from lit_rlhf.rollout.batches import Rollout
    from lit_rlhf.rollout.experience import Experience

    devices = 1 if check.strategy == "single" else step_devices(cuda)
    per_rank, p, t = STEP_ROWS // devices, size.step_prompt_len, size.step_response_len
    g = torch.Generator().manual_seed(0)
    vocab = 300  # ids the tokenizer knows, on every model size
    sequences = torch.randint(10, vocab, (STEP_ROWS, p + t), generator=g)
    lengths = torch.randint(1, t + 1, (STEP_ROWS,), generator=g)
    loss_mask = torch.arange(t) < lengths.unsqueeze(1)
    attention_mask = torch.cat([torch.ones(STEP_ROWS, p, dtype=torch.long), loss_mask.long()], 1)
    advantages = F.masked_whiten(torch.randn(STEP_ROWS, t, generator=g), loss_mask) * loss_mask
    saved: dict[str, torch.Tensor] = {}

    class FixedStep(PPOModule):
        def rows(self):
            rank = self.trainer.global_rank
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            return sequences[rows].to(self.device), attention_mask[rows].to(self.device), rows

        @torch.no_grad()
        def score(self):
            from lit_rlhf.modules.ppo_rollout import fsdp1_full_params

            seq, mask, _ = self.rows()
            with fsdp1_full_params(self.trainer):
                return self.actor(seq, mask, t).float().cpu(), self.critic(seq, mask, t).float().cpu()

        def collect_rollout(self, rollout_index: int) -> Rollout:
            old, values = self.score()
            saved["log_probs_before"], saved["values_before"] = old, values
            _, _, rows = self.rows()
            adv = advantages[rows]
            zeros = torch.zeros_like(old)
            experience = Experience(
                sequences=sequences[rows],
                attention_mask=attention_mask[rows],
                loss_mask=loss_mask[rows],
                old_log_probs=old,
                rollout_log_probs=old,
                ref_log_probs=old,
                values=values,
                rewards=zeros,
                advantages=adv,
                returns=values + adv,
                scores=torch.zeros(per_rank),
                kl=zeros,
                rollout_id=torch.zeros(per_rank, dtype=torch.long),
            )
            timing = {"generation_s": 0.0, "scoring_s": 0.0, "advantages_s": 0.0, "generated_tokens": 1.0}
            return Rollout(experience.to(self.device), {}, timing)

        def on_train_end(self) -> None:
            saved["log_probs_after"], saved["values_after"] = self.score()
            super().on_train_end()  # the export (under FSDP: gathered from the shards)

    settings = module_settings(check, kit, size, cuda)
    settings["rollout"].update(rollout_batch_size=per_rank, score_micro_batch_size=per_rank)
    settings["algorithm"].update(mini_batch_size=per_rank, micro_batch_size=max(1, per_rank // 2))
    settings["generation"]["max_new_tokens"] = t
    module = FixedStep(
        **settings,
        optim={
            "actor": {"optimizer": lambda p: torch.optim.SGD(p, lr=0.5), "max_grad_norm": None},
            "critic": {"optimizer": lambda p: torch.optim.SGD(p, lr=0.5), "max_grad_norm": None},
        },
    )
    L.seed_everything(0, verbose=False)
    trainer = trainer_for(check, cuda, devices, [], out, max_epochs=1)
    data = PromptDataModule(os.path.join(kit, "prompts.jsonl"), apply_chat_template=True, max_prompt_len=256)
    trainer.fit(module, datamodule=data)
    os.makedirs(os.path.join(out, "steps"), exist_ok=True)
    torch.save(saved, os.path.join(out, "steps", f"{check.name}.rank{trainer.global_rank}.pt"))
    return {"status": "pass", "reason": "", "numbers": {"ranks": devices, "peak_memory_gib": peak_memory_gib(cuda)}}


def run_one(name: str, out: str, dry_run: bool) -> None:
    """The child process: run check ``name``, write ``out/checks/name.json`` (rank 0)."""
    import torch

    check, size = BY_NAME[name], sizes(dry_run)
    cuda = torch.cuda.is_available() and not dry_run
    kit = kit_dir(out, dry_run)
    runner = run_step if check.kind == "step" else run_iterations
    result = runner(check, kit, size, cuda, out)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        if not export_written(out, check):
            result = {**result, "status": "fail", "reason": "; ".join(filter(None, [result["reason"], "no export"]))}
        os.makedirs(os.path.join(out, "checks"), exist_ok=True)
        with open(os.path.join(out, "checks", f"{name}.json"), "w") as f:
            json.dump(result, f)
