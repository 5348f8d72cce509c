"""Pure tensor math of PPO-style RLHF and preference optimisation. Imports only torch.

Shapes: ``B`` batch, ``T`` (or ``A``) action positions, ``V`` vocabulary. Masks are 0/1 or bool,
``True``/1 meaning "this position counts" (for a response: the policy sampled this token in this
rollout). A mask may have holes (a multi-turn response holds tool output the policy did not
sample); every function here treats a row as the sequence of its masked-in positions. Masked-out
positions never leak into a result, even when they hold ``inf`` or ``nan``.

``ppo``: log-probs, masked statistics, KL estimators, token rewards, GAE, group advantages and
the PPO losses; ``preference``: DPO and its variants. Import both from here.
"""

from lit_rlhf.functional.ppo import (
    GROUP_METHODS,
    K3_LOG_RATIO_BOUND,
    KL_ESTIMATORS,
    GAEResult,
    GroupMethod,
    KLEstimator,
    approx_kl,
    behaviour_weights,
    clip_fraction,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    last_valid_index,
    log_probs_from_hidden,
    log_probs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    truncated_importance_weights,
    value_loss,
)
from lit_rlhf.functional.preference import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    PreferenceLossType,
    dpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    preference_logits,
    sequence_log_probs,
    simpo_loss,
)

__all__ = [
    "GAEResult",
    "GROUP_METHODS",
    "GroupMethod",
    "K3_LOG_RATIO_BOUND",
    "KLEstimator",
    "KL_ESTIMATORS",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "PreferenceLossType",
    "approx_kl",
    "behaviour_weights",
    "clip_fraction",
    "dpo_loss",
    "dpo_sigmoid_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "hinge_loss",
    "ipo_loss",
    "last_valid_index",
    "log_probs_from_hidden",
    "log_probs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "preference_logits",
    "sequence_log_probs",
    "simpo_loss",
    "token_rewards",
    "truncated_importance_weights",
    "value_loss",
]
