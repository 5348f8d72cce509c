"""Every seed the package derives from the run's seed, in one place (imports nothing).

A resumed run continues the same trajectory because each random choice depends only on the run's
seed and where it happens (rollout, rank, batch), never on the global RNG's state.
"""

from __future__ import annotations


def rollout_seed(seed: int, rollout: int, rank: int) -> int:
    """The seed of the first row of rollout ``rollout`` on ``rank``; row ``i`` is seeded ``+ i``."""
    return seed * 1_000_003 + rollout * 1_009 + rank


def stream_seed(seed: int, rank: int) -> int:
    """The first row seed of ``rank``'s prompt stream in asynchronous rollouts: the sample ``i`` of the
    prompt at stream position ``p`` is seeded ``+ p * n_samples_per_prompt + i`` (ranks 2**40 apart)."""
    return (seed * 1_000_003 + 1) * 2**20 + rank * 2**40


def buffer_order_seed(seed: int, rollout: int) -> int:
    """The shuffled mini-batch order of rollout ``rollout``'s experience buffer."""
    return seed * 1_000_003 + rollout


def prompt_order_seed(seed: int, epoch: int) -> int:
    """The order of the prompt file in epoch ``epoch`` (of the prompts, not of the rollouts)."""
    return seed * 7919 + epoch


def validation_seed(batch_idx: int) -> int:
    """Sampled validation of batch ``batch_idx``: the same responses at every validation of a policy."""
    return 10_007 + batch_idx


def turn_seed(row_seed: int, turn: int) -> int:
    """Turn ``turn`` of a multi-turn row seeded ``row_seed``; turn 0 is the row's own seed (one turn
    samples exactly what a single-turn rollout does)."""
    return row_seed + turn * 104_729
