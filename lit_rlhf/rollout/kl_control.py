"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al., 2019)."""

from __future__ import annotations

from lit_rlhf.settings import KLSettings


class KLController:
    """A fixed KL coefficient.

    Args:
        kl_coef: the coefficient beta.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Fixed: nothing changes."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(KLController):
    """Adapts beta so that the KL per sequence tracks ``target``: beta *= 1 + clip(KL/target - 1, ±0.2) * n/horizon.

    Args:
        kl_coef: initial beta.
        target: KL per sequence (nats) to aim for.
        horizon: number of samples over which the error is corrected.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs kl_target > 0 and kl_horizon > 0, got {target}, {horizon}")
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(kl: KLSettings) -> KLController:
    """A fixed controller, or an adaptive one when ``kl.target`` is set."""
    if kl.target is None:
        return KLController(kl.coef)
    return AdaptiveKLController(kl.coef, target=kl.target, horizon=kl.horizon)
