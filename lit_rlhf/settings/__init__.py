"""The settings groups: typed, frozen, validated on construction. The public config schema.

Each group is a frozen dataclass whose field docstrings become ``--help`` lines; ``__post_init__``
checks ranges and the interactions between fields of the same group and raises ``ValueError``
naming the field. Checks that span groups live in the module that owns the groups
(``lit_rlhf.modules.ppo_setup.check_ppo_settings``). Nothing here imports Lightning or
transformers, so every layer of the package can receive a group directly. One file per kind of
group: ``loading`` (models), ``ppo`` (generation, rollout, algorithm, KL),
``multi_turn`` and ``asynchronous`` (rollout subgroups), ``optim``, ``dpo``;
import them from here.

YAML: ``model.init_args.<group>.<field>``; CLI: ``--model.init_args.<group>.<field>``. From Python a
group can be given as an instance or as a plain ``dict`` of its fields (:func:`as_group`).
"""

from lit_rlhf.plain_data import as_group, import_object, save_settings, to_plain
from lit_rlhf.settings.asynchronous import AsyncSettings
from lit_rlhf.settings.common import (
    CRITIC_FREE,
    GROUP_ESTIMATORS,
    AdvantageEstimator,
    AttnImplementation,
    DType,
    KLEstimator,
    LRScheduler,
    OptimizerCallable,
)
from lit_rlhf.settings.dpo import DPOSettings
from lit_rlhf.settings.loading import DPOModelSettings, LoadSettings, LoraSettings, ModelSettings, PPOModelSettings
from lit_rlhf.settings.multi_turn import MultiTurnSettings
from lit_rlhf.settings.optim import OptimizerSettings, PPOOptimSettings
from lit_rlhf.settings.ppo import (
    ENGINE_SHORTHANDS,
    AlgorithmSettings,
    GenerationSettings,
    KLSettings,
    RolloutSettings,
)

__all__ = [
    "CRITIC_FREE",
    "ENGINE_SHORTHANDS",
    "GROUP_ESTIMATORS",
    "AdvantageEstimator",
    "AlgorithmSettings",
    "AsyncSettings",
    "AttnImplementation",
    "DPOModelSettings",
    "DPOSettings",
    "DType",
    "GenerationSettings",
    "KLEstimator",
    "KLSettings",
    "LRScheduler",
    "LoadSettings",
    "LoraSettings",
    "ModelSettings",
    "MultiTurnSettings",
    "OptimizerCallable",
    "OptimizerSettings",
    "PPOModelSettings",
    "PPOOptimSettings",
    "RolloutSettings",
    "as_group",
    "import_object",
    "save_settings",
    "to_plain",
]
