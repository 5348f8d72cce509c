"""One command that proves the GPU path: ``python -m lit_rlhf.gpu_check --out DIR`` (``make gpu-check``).

On a model of Qwen2.5-0.5B-Instruct's shape built from its config (random weights, nothing is
downloaded; a ChatML tokenizer trained on the spot, its ids a part of the 151,936-token vocabulary),
each check runs in a process of its own, so that one failure or out-of-memory leaves the others
standing and Lightning can launch the multi-GPU ones:

- bf16-mixed PPO (GAE critic) and GRPO iterations with sdpa, with gradient checkpointing, with LoRA;
- flash-attention 2 and QLoRA 4-bit, when flash-attn / bitsandbytes are installed;
- the vLLM engine, when vllm is installed: the log-prob probe after every weight push, and its
  ``perf/weight_sync_s``;
- one optimizer step under FSDP1 (``strategy: fsdp``) and FSDP2 (``ModelParallelStrategy``) on the
  machine's GPUs, against the same step on one device.

Each check passes or fails with its numbers: seconds per iteration, generation and training
tokens/s, the training phase's model FLOPs utilisation against the GPU's dense bf16 peak, peak
memory. ``results.json`` and ``results.md`` go to ``--out``, each check's log to ``--out/logs``; the
exit status is 1 when a check failed. ``--dry-run`` runs the same checks on the CPU with a tiny
Qwen2 in fp32 (the GPU-only ones are skipped with their reason), so that the command cannot rot.

It imports only what it exercises: torch, transformers, lightning, peft and jsonargparse (no W&B,
no LitServe), and an optional extra only in the check that needs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name()
BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)
OPTIONAL = {"flash_attn": "flash-attn", "bitsandbytes": "bitsandbytes", "vllm": "vllm"}
STEP_TOLERANCE = 1e-3  # FSDP vs one device: max |Δ log-prob| difference over the largest |Δ log-prob|, fp32
# the engine's sampled log-probs against the trainer's, after a push (mean |difference| per token): the
# same fp32 weights on CPU; on a GPU a bf16 engine against the bf16-mixed trainer
PROBE_TOLERANCE = {"cpu": 1e-4, "cuda": 0.05}
STEP_ROWS = 16  # the fixed experiences of the one-step comparison, split over the ranks


@dataclass(frozen=True)
class Check:
    """One check: ``iterations`` (PPO/GRPO iterations on generated rollouts) or ``step`` (one optimizer
    step on fixed experiences, compared with ``step_single``)."""

    name: str
    title: str
    algorithm: str = "grpo"  # ppo (GAE critic) | grpo
    kind: str = "iterations"
    models: dict = field(default_factory=dict)
    engine: str = "native"  # native | vllm
    strategy: str = "single"  # single | fsdp1 | fsdp2 (kind "step")
    needs: str | None = None  # an optional package (its import name)
    gpu_only: bool = False


LORA = {"rank": 32, "alpha": 32, "target_modules": "all-linear"}
CHECKS = (
    Check("ppo_gae", "PPO, GAE critic (sdpa)", "ppo"),
    Check("grpo", "GRPO (sdpa)"),
    Check("ppo_gae_checkpointing", "PPO, GAE critic, gradient checkpointing", "ppo", {"gradient_checkpointing": True}),
    Check("grpo_lora", "GRPO, LoRA r32 all-linear", models={"lora": LORA}),
    Check(
        "grpo_flash_attention_2",
        "GRPO, flash-attention 2, padding-free",
        models={"attn_implementation": "flash_attention_2", "padding_free": True},
        needs="flash_attn",
        gpu_only=True,
    ),
    Check("grpo_qlora", "GRPO, QLoRA 4-bit NF4", models={"load_in_4bit": True, "lora": LORA}, needs="bitsandbytes"),
    Check("grpo_vllm", "GRPO, vLLM engine (weight push + probe)", engine="vllm", needs="vllm"),
    Check("step_single", "one PPO step, one device (the reference)", "ppo", "step"),
    Check("step_fsdp1", "one PPO step, FSDP1 (strategy: fsdp)", "ppo", "step", strategy="fsdp1", gpu_only=True),
    Check("step_fsdp2", "one PPO step, FSDP2 (ModelParallelStrategy)", "ppo", "step", strategy="fsdp2"),
)
BY_NAME = {check.name: check for check in CHECKS}


@dataclass(frozen=True)
class Sizes:
    """How big the model and the rollouts are: Qwen2.5-0.5B on a GPU, a tiny Qwen2 in the dry run."""

    scale: int
    prompts: int  # per rollout (GRPO: times samples)
    samples: int  # GRPO's group size
    max_new_tokens: int
    mini_batch: int
    micro_batch: int
    iterations: int  # the first one warms up; the numbers are the mean of the rest
    step_prompt_len: int
    step_response_len: int
    timeout_s: int


GPU_SIZES = Sizes(1, 64, 4, 128, 32, 16, 3, 64, 32, 300)
DRY_SIZES = Sizes(16, 4, 2, 8, 4, 2, 2, 12, 6, 300)


def sizes(dry_run: bool) -> Sizes:
    return DRY_SIZES if dry_run else GPU_SIZES


# --- the kit: a model, its tokenizer and prompts, written once -----------------------------------


QUESTION = "Natalia sold clips to {a} of her friends in April, and then she sold {b} clips in May. How many in all?"
INSTRUCTION = "Let's think step by step and output the final answer after '####'."


def varied_reward(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """A score that differs between samples (random weights never get GSM8K right), so that GRPO's
    groups have advantages to train on: the share of the response's characters that are digits."""
    return [sum(ch.isdigit() for ch in r) / max(1, len(r)) for r in responses]


def kit_dir(out: str, dry_run: bool) -> str:
    """The kit of a mode: ``out/kit`` (Qwen2.5-0.5B's shape) or ``out/kit-dry-run`` (tiny), so a GPU run
    into a folder that once held a dry run never measures the tiny model (nor the other way round)."""
    return os.path.join(out, "kit-dry-run" if dry_run else "kit")


def prepare_kit(out: str, dry_run: bool) -> str:
    """The mode's kit: a random-weight Qwen2 (Qwen2.5-0.5B's shape, or tiny), a ChatML tokenizer, prompts.

    Built once: ``ready.json``, written last, marks a whole kit; one without it (an interrupted build)
    is built again."""
    from lit_rlhf.tasks import build_causal_lm, chat_tokenizer, qwen2_config

    kit = kit_dir(out, dry_run)
    if os.path.exists(os.path.join(kit, "ready.json")):
        return kit
    shutil.rmtree(kit, ignore_errors=True)  # a partial kit of this mode, made by this command
    os.makedirs(kit)
    rows = [
        {"prompt": f"{QUESTION.format(a=a, b=b)} {INSTRUCTION}", "answer": str(a + b)}
        for a in range(10, 60)
        for b in range(1, 9)
    ]
    with open(os.path.join(kit, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    corpus = [row["prompt"] for row in rows] * 2
    tokenizer = chat_tokenizer("chatml", corpus, vocab_size=2000 if not dry_run else 400, split_digits=True)
    if dry_run:  # head size 64 (vLLM's CPU attention has no smaller one)
        config = qwen2_config(tokenizer, scale=16, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    else:  # the real vocabulary; the tokenizer's ids are its first entries
        config = qwen2_config(
            None,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    build_causal_lm(config).save_pretrained(os.path.join(kit, "model"))
    tokenizer.save_pretrained(os.path.join(kit, "model"))
    with open(os.path.join(kit, "ready.json"), "w") as f:
        json.dump({"dry_run": dry_run, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size}, f)
    return kit


# --- one check, in its own process -----------------------------------------------------------------


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


def model_flops_per_token(path: str, lora: bool) -> tuple[float, int]:
    """Training FLOPs per token of the actor (forward + backward: 6 N, or 4 N through a LoRA adapter,
    where no base weight gets a gradient; N counts every matmul weight, the output layer's included,
    the embedding lookup not) and N itself."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    n = layers * (attention + 3 * h * inter) + h * config.vocab_size
    return (4.0 if lora else 6.0) * n, n


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


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


def compare_steps(out: str, name: str, ranks: int) -> dict:
    """``name``'s step against ``step_single``'s: how far apart the log-prob and value changes are."""
    import torch

    def load(check: str, count: int) -> dict:
        paths = [os.path.join(out, "steps", f"{check}.rank{r}.pt") for r in range(count)]
        parts = [torch.load(path, weights_only=True) for path in paths]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    single, sharded = load("step_single", 1), load(name, ranks)
    numbers: dict[str, float] = {"tolerance": STEP_TOLERANCE}
    for what in ("log_probs", "values"):
        change = single[f"{what}_after"] - single[f"{what}_before"]
        other = sharded[f"{what}_after"] - sharded[f"{what}_before"]
        numbers[f"{what}_change_max"] = float(change.abs().max())
        numbers[f"{what}_relative_diff"] = float((change - other).abs().max() / change.abs().max().clamp_min(1e-12))
    worst = max(numbers["log_probs_relative_diff"], numbers["values_relative_diff"])
    moved = numbers["log_probs_change_max"] > 1e-4
    reason = (
        ""
        if moved and worst <= STEP_TOLERANCE
        else (
            "the step did not change the log-probs"
            if not moved
            else f"relative difference {worst:.2e} > {STEP_TOLERANCE}"
        )
    )
    return {"status": "pass" if not reason else "fail", "reason": reason, "numbers": numbers}


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


# --- the parent: which checks run, in their processes; the report --------------------------------


def skip_reason(check: Check, dry_run: bool, cuda: bool) -> str | None:
    if check.gpu_only and (dry_run or not cuda):
        return "needs a GPU" + (" (dry run)" if dry_run else "")
    if check.needs is not None and importlib.util.find_spec(check.needs) is None:
        return f"{check.needs} is not installed (pip install {OPTIONAL[check.needs]})"
    if check.needs == "bitsandbytes" and (dry_run or not cuda):
        return "QLoRA 4-bit needs a GPU" + (" (dry run)" if dry_run else "")
    return None


def machine(dry_run: bool) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "missing_optional": [pip for module, pip in OPTIONAL.items() if importlib.util.find_spec(module) is None],
    }
    for package in ("transformers", "lightning", "peft", "flash_attn", "bitsandbytes", "vllm"):
        if importlib.util.find_spec(package) is not None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                info[package] = version({"flash_attn": "flash-attn"}.get(package, package))
            except PackageNotFoundError:
                info[package] = "?"
    info["bf16_peak_tflops"] = peak_tflops(info["device"]) if cuda else None
    return info


def run_checks(out: str, dry_run: bool, only: list[str] | None = None, peak: float | None = None) -> dict:
    """Run every check (or ``only`` these) in its own process; write results.json and results.md."""
    info = machine(dry_run)
    cuda = info["gpus"] > 0
    peak = peak or info["bf16_peak_tflops"]
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    kit_start = time.perf_counter()
    prepare_kit(out, dry_run)
    info["kit_s"] = time.perf_counter() - kit_start
    if only and any(BY_NAME[name].kind == "step" for name in only):
        only = [*only, "step_single"]  # the reference of the FSDP steps
    results = []
    for check in CHECKS:
        if only and check.name not in only:
            continue
        row = {"name": check.name, "title": check.title}
        reason = skip_reason(check, dry_run, cuda)
        if reason is not None:
            results.append({**row, "status": "skip", "reason": reason, "numbers": {}, "seconds": 0.0})
            print(f"[gpu-check] {check.name}: skip ({reason})", flush=True)
            continue
        result_file = os.path.join(out, "checks", f"{check.name}.json")
        if os.path.exists(result_file):
            os.remove(result_file)
        command = [sys.executable, "-m", "lit_rlhf.gpu_check", "--run-one", check.name, "--out", out]
        command += ["--dry-run"] if dry_run else []
        start = time.perf_counter()
        print(f"[gpu-check] {check.name}: {check.title} ...", flush=True)
        log_path = os.path.join(out, "logs", f"{check.name}.log")
        with open(log_path, "w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=sizes(dry_run).timeout_s)
                returncode = code.returncode
            except subprocess.TimeoutExpired:
                returncode = None
        seconds = time.perf_counter() - start
        if returncode == 0 and os.path.exists(result_file):
            with open(result_file) as f:
                result = json.load(f)
        else:
            with open(log_path) as f:
                tail = f.read().strip().splitlines()[-1:] or [""]
            why = f"timed out after {sizes(dry_run).timeout_s} s" if returncode is None else f"exit {returncode}"
            result = {"status": "fail", "reason": f"{why}: {tail[0][-300:]} (log: {log_path})", "numbers": {}}
        if result["status"] == "pass" and check.kind == "step" and check.name != "step_single":
            single = next((r for r in results if r["name"] == "step_single"), None)
            if single is None or single["status"] != "pass":
                result = {"status": "fail", "reason": "no single-device step to compare with", "numbers": {}}
            else:
                numbers = result["numbers"]
                result = compare_steps(out, check.name, int(numbers["ranks"]))
                result["numbers"].update(numbers)
        numbers = result["numbers"]
        if peak and "train_tokens_per_s" in numbers:
            flops = numbers["train_flops_per_token"] * numbers["train_tokens_per_s"]
            numbers["mfu"] = flops / (peak * 1e12)
        results.append({**row, **result, "seconds": seconds})
        print(f"[gpu-check] {check.name}: {result['status']} in {seconds:.0f} s {result['reason']}", flush=True)
    passed = all(r["status"] != "fail" for r in results)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    results = [{**r, "run": stamp} for r in results]
    report = {"machine": info, "checks": merged(out, results, dry_run), "passed": passed}
    write_report(out, report)
    return report


def merged(out: str, results: list[dict], dry_run: bool) -> list[dict]:
    """This run's rows, and the rows of an earlier run into ``out`` (the same mode) for the checks this
    one did not run, in the checks' order: rerunning one check keeps the rest of the table."""
    path = os.path.join(out, "results.json")
    earlier: list[dict] = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
            if previous["machine"]["dry_run"] == dry_run:
                earlier = previous["checks"]
        except (OSError, ValueError, KeyError, TypeError):
            earlier = []  # not a report of this command: replaced
    ran = {r["name"] for r in results}
    rows = {r["name"]: r for r in earlier if r.get("name") in BY_NAME and r["name"] not in ran}
    rows.update({r["name"]: r for r in results})
    return [rows[check.name] for check in CHECKS if check.name in rows]


def write_report(out: str, report: dict) -> None:
    """results.json and results.md, each replaced in one step (a temporary file renamed over it)."""
    for name, text in (("results.json", json.dumps(report, indent=1)), ("results.md", markdown(report))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def _fmt(value: Any, digits: int = 0, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return f"{value * scale:,.{digits}f}"


def markdown(report: dict) -> str:
    """The results as a Markdown table (what the README shows)."""
    info = report["machine"]
    lines = [
        f"`python -m lit_rlhf.gpu_check{' --dry-run' if info['dry_run'] else ''}` on {info['device']}"
        f" × {max(info['gpus'], 1)}, torch {info['torch']}"
        + (f" (CUDA {info['cuda']})" if info["cuda"] else "")
        + (f"; missing optional: {', '.join(info['missing_optional'])}" if info["missing_optional"] else ""),
        "",
        "| check | result | s/iter | gen tok/s | train tok/s | MFU | peak GiB | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["checks"]:
        n = r["numbers"]
        notes = r["reason"]
        if "weight_sync_s" in n:
            notes = f"weight_sync_s {n['weight_sync_s']:.3f}, probe diff {n.get('weight_check_logprob_diff', 0):.2e}"
        if "log_probs_relative_diff" in n:
            notes = (
                f"{n['ranks']:.0f} ranks; Δlog-prob rel. diff {n['log_probs_relative_diff']:.1e}, "
                f"Δvalue {n['values_relative_diff']:.1e} (tolerance {n['tolerance']:.0e})"
            )
        if "policy_loss" in n and not notes:
            notes = f"reward {n['reward_mean']:.3f}, policy loss {n['policy_loss']:.3f}"
            notes += f", value loss {n['value_loss']:.3f}" if "value_loss" in n else ""
        if r["status"] == "fail" and r["reason"]:
            notes = r["reason"]
        lines.append(
            f"| {r['title']} | {r['status']} | {_fmt(n.get('s_per_iter'), 2)} | "
            f"{_fmt(n.get('generation_tokens_per_s'))} | {_fmt(n.get('train_tokens_per_s'))} | "
            f"{_fmt(n.get('mfu'), 1, 100.0)}{'%' if n.get('mfu') is not None else ''} | "
            f"{_fmt(n.get('peak_memory_gib'), 2)} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of TFLOP/s, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, logs/ and the kit")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on CPU with a tiny Qwen2 in fp32")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run these checks only")
    parser.add_argument(
        "--peak_tflops", type=positive_float, help="the GPU's dense bf16 peak (TFLOP/s), if it is not in the table"
    )
    parser.add_argument("--run-one", choices=list(BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.run_one:
        run_one(args.run_one, args.out, args.dry_run)
        return 0
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a file: pass a folder (it is made if missing)")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: the checks are sized for a GPU; pass --dry-run to run them on CPU")
    report = run_checks(args.out, args.dry_run, args.only, args.peak_tflops)
    print(markdown(report))
    print(f"[gpu-check] results: {os.path.join(args.out, 'results.json')} and results.md")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
