"""Learning-rate schedules per epoch, and a PNG plot of one."""

from __future__ import annotations

import math
from pathlib import Path

from training.config import ScheduleConfig


def learning_rate(config: ScheduleConfig, epoch: int, epochs: int, replicas: int = 1, unfreeze_epoch: int = 0) -> float:
    """The learning rate of a 0-based epoch; the peak is scaled by the number of replicas.

    From `unfreeze_epoch` on (when it is > 0) the rate is multiplied by `unfreeze_scale`.
    """
    rate = _base_rate(config, epoch, epochs, replicas)
    return rate * config.unfreeze_scale if unfreeze_epoch and epoch >= unfreeze_epoch else rate


def _base_rate(config: ScheduleConfig, epoch: int, epochs: int, replicas: int) -> float:
    """The schedule's rate before any unfreeze scaling."""
    peak = config.max * replicas
    if config.kind == "constant":
        return peak
    if config.kind == "rampup":
        # The public flower notebooks' ramp-up / sustain / exponential decay.
        if epoch < config.rampup_epochs:
            return config.start + (peak - config.start) * epoch / config.rampup_epochs
        if epoch < config.rampup_epochs + config.sustain_epochs:
            return peak
        decayed = epoch - config.rampup_epochs - config.sustain_epochs
        return config.min + (peak - config.min) * config.decay**decayed
    if config.kind == "cosine":
        if epoch < config.warmup_epochs:
            return config.start + (peak - config.start) * epoch / config.warmup_epochs
        span = max(epochs - config.warmup_epochs, 1)
        progress = (epoch - config.warmup_epochs) / span
        return config.min + (peak - config.min) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule kind {config.kind!r}")


def plot_schedule(path: Path, config: ScheduleConfig, epochs: int, replicas: int = 1, unfreeze_epoch: int = 0) -> Path:
    """Write a PNG of the learning rate over the epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.files import write_atomic

    values = [learning_rate(config, e, epochs, replicas, unfreeze_epoch) for e in range(epochs)]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, epochs + 1), values, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    if unfreeze_epoch:
        ax.axvline(unfreeze_epoch + 0.5, color="grey", linestyle="--", label="backbone unfrozen")
        ax.legend()
    ax.set_title(f"{config.kind} schedule ({replicas} replica{'s' if replicas > 1 else ''})")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return path
