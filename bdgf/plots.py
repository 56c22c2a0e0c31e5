"""Training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.5 * ncols, 3.4), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_pretrain_curves(records: list[dict], out: str | Path) -> Path:
    """Loss, per-modality losses and masking probabilities against the step."""
    plt, fig, (ax_loss, ax_mod, ax_p) = _figure(3)
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set(title="denoising loss", xlabel="step", yscale="log")
    keys = sorted({k for r in records for k in r if k.startswith("loss/")})
    for k in keys:
        ax_mod.plot(steps, [r.get(k) for r in records], label=k.split("/", 1)[1])
    ax_mod.set(title="loss per modality", xlabel="step", yscale="log")
    for k in sorted({k for r in records for k in r if k.startswith("p_mask/")}):
        ax_p.plot(steps, [r.get(k) for r in records], label=k.split("/", 1)[1])
    ax_p.set(title="masking probability", xlabel="step", ylim=(0, 1))
    for ax in (ax_mod, ax_p):
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(plt, fig, Path(out))


def plot_train_curves(records: list[dict], out: str | Path) -> Path:
    """Classifier loss terms per step and validation accuracy per epoch."""
    plt, fig, (ax_loss, ax_val) = _figure(2)
    steps = [r for r in records if "step" in r and "loss" in r]
    for k in sorted({k for r in steps for k in r if k == "loss" or k.startswith("term/")}):
        ax_loss.plot([r["step"] for r in steps], [r.get(k) for r in steps], label=k)
    ax_loss.set(title="training loss", xlabel="step", yscale="log")
    if ax_loss.lines:
        ax_loss.legend(fontsize=7)
    vals = [r for r in records if "val_oa" in r]
    ax_val.plot([r["epoch"] for r in vals], [r["val_oa"] for r in vals], marker="o", label="val OA")
    ax_val.set(title="validation", xlabel="epoch", ylim=(0, 1))
    ax_val.legend(fontsize=8)
    return _save(plt, fig, Path(out))
