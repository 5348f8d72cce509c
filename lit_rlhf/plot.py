"""A picture of any run: one panel per metric, from the run's CSV log.

python -m lit_rlhf.plot RUN_DIR [--out plot.png]

PPO runs show reward, KL, response length and every ``val/*`` metric per rollout; other stages
(SFT, reward model) their training losses and ``val/*`` metrics per step. ``lit-rlhf fit`` draws
it at the end of every run (``metrics.png`` in the run directory).
"""

from __future__ import annotations

import argparse
import glob
import os

import lightning as L

PPO_PANELS = ("reward/mean", "rollout/kl", "rollout/response_length")


def newest_run(path: str) -> str:
    """``path`` itself, or its newest ``version_<N>`` run folder when it is a config's root (``runs/ppo_tiny``)."""
    versions = [d for d in glob.glob(os.path.join(path, "version_*")) if os.path.isdir(d)]
    numbered = [(int(v.rsplit("_", 1)[1]), v) for v in versions if v.rsplit("_", 1)[1].isdigit()]
    return max(numbered)[1] if numbered else path


def find_metrics(run_dir: str) -> str:
    """The run's ``metrics.csv`` (the newest, if the directory holds several runs)."""
    candidates = sorted(glob.glob(os.path.join(run_dir, "**", "metrics.csv"), recursive=True), key=os.path.getmtime)
    if not candidates:
        raise FileNotFoundError(
            f"no metrics.csv under {run_dir!r}: give a run directory of lit-rlhf fit (runs/<name>/version_<N>)"
        )
    return candidates[-1]


def panels(frame) -> tuple[str, list[str]]:
    """``(x column, metrics)``: per rollout for PPO, per step otherwise; every ``val/*`` metric too."""
    val = sorted(c for c in frame.columns if c.startswith("val/") and frame[c].notna().any())
    if "reward/mean" in frame.columns:
        return "epoch", [m for m in PPO_PANELS if m in frame.columns and frame[m].notna().any()] + val
    losses = sorted(c for c in frame.columns if c.endswith("/loss") and not c.startswith("val/"))
    return "step", [m for m in losses if frame[m].notna().any()] + val


def figure(frame, title: str = ""):
    """A matplotlib figure with one panel per metric, and the metrics in panel order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, metrics = panels(frame)
    if not metrics:
        raise ValueError(f"the CSV log has none of the metrics to plot ({', '.join(PPO_PANELS)}, */loss, val/*)")
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        series = frame.dropna(subset=[metric]).groupby(x)[metric].mean()
        ax.plot(series.index, series.values, "o-" if len(series) < 30 else "-", markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("rollout" if x == "epoch" else x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        fig.delaxes(ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig, metrics


def plot_run(run_dir: str, out: str | None = None) -> tuple[str, list[str]]:
    """Draw ``run_dir``'s metrics into ``out`` (default ``metrics.png`` in the run directory).

    ``run_dir`` may also be a config's root (``runs/ppo_tiny``): its newest run is drawn.

    Returns:
        The PNG's path and the metrics drawn, one panel each.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    run_dir = newest_run(run_dir)
    frame = pd.read_csv(find_metrics(run_dir))
    fig, metrics = figure(frame, title=os.path.normpath(run_dir))
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, metrics


class PlotCallback(L.Callback):
    """Draw the run's metrics (``metrics.png`` in its run directory) at the end of ``fit``."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lit_rlhf.modules.outputs import run_directory

        self.run_dir = run_directory(trainer)  # on every rank: a collective under DDP

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()  # flush the CSV log before reading it
        try:
            out, _ = plot_run(self.run_dir)
        except (FileNotFoundError, ValueError) as err:  # no CSV log, or nothing logged yet
            print(f"no plot: {err}")
            return
        print(f"plot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (runs/<name>/version_<N>; runs/<name>: its newest run)")
    parser.add_argument("--out", default=None, help="PNG path (default: metrics.png in the run directory)")
    args = parser.parse_args()
    out, metrics = plot_run(args.run_dir, args.out)
    print(f"{out}: {', '.join(metrics)}")


if __name__ == "__main__":
    main()
