"""Reward components: a weighted sum of functions, reward models and remote rewards.

In a config::

    rewards:
      - class_path: lit_rlhf.rewards.RewardModel
        init_args: {path: my/rm, weight: 1.0}
      - class_path: lit_rlhf.rewards.RewardFunction
        init_args: {fn: mypkg.rewards.exact_match, weight: 0.5}
"""

from lit_rlhf.rewards.base import (
    RewardBatch,
    RewardComponent,
    RewardError,
    score_components,
)
from lit_rlhf.rewards.function import RewardFunction
from lit_rlhf.rewards.inputs import MissingColumn
from lit_rlhf.rewards.model import RewardModel
from lit_rlhf.rewards.remote import RemoteReward
from lit_rlhf.rewards.scorer import RewardScorer, Scores

__all__ = [
    "MissingColumn",
    "RemoteReward",
    "RewardBatch",
    "RewardComponent",
    "RewardError",
    "RewardFunction",
    "RewardModel",
    "RewardScorer",
    "Scores",
    "score_components",
]
