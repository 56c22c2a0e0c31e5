"""What each stage returns: small typed records that the CLI, the demo, the benchmarks and the
HTTP app print or read. Single-process and distributed runs fill the same fields
(``workers`` is 1 and ``engine`` "torch" for a plain single process). ``device`` ("cpu" | "gpu")
is what the work ran on, chosen where it runs (the cluster's resources, or this machine's for a
single process), and ``device_reason`` says why (e.g. "cluster has no GPU")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def most_masked(p_mask: dict[str, float | None]) -> str:
    """The modality with the highest final masking probability, or "none (equal)" on a tie."""
    p = {n: round(v or 0.0, 3) for n, v in p_mask.items()}
    if not p:
        return "none (equal)"
    top = max(p.values())
    leaders = [n for n, v in p.items() if v == top]
    return leaders[0] if len(leaders) == 1 else "none (equal)"


class _Record:
    """Every summary saves as a plain dict (run.json, summary.json, metrics.json)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def _device(r) -> str:
    return f"{r.device} ({r.device_reason})" if r.device_reason else r.device


@dataclass
class PretrainSummary(_Record):
    steps: int
    final_loss: float | None
    loss_per_modality: dict[str, float | None]
    p_mask: dict[str, float | None]
    most_masked: str
    wall_s: float
    tiles_per_s: float | None  # global (all workers), mean over the logged intervals
    workers: int
    engine: str
    checkpoint: str | None = None  # the Ray Train checkpoint the run dir was filled from
    device: str = "cpu"
    device_reason: str = ""

    def line(self) -> str:
        mods = ", ".join(f"{n}: loss {_num(self.loss_per_modality[n], '.4f')} p_mask {_num(self.p_mask[n], '.2f')}"
                         for n in self.loss_per_modality)
        return (f"pretrained {self.steps} steps on {self.workers} worker(s) ({self.engine}), loss "
                f"{_num(self.final_loss, '.4f')} ({mods}); most masked: {self.most_masked}; "
                f"{_num(self.tiles_per_s, '.1f')} tiles/s; {self.wall_s:.1f} s; {_device(self)}")


FEATURE_STATES = {"reuse": "reused cached", "resume": "resumed", "new": "computed",
                  "recompute": "recomputed (cache was for another checkpoint)"}


@dataclass
class FeatureSummary(_Record):
    state: str  # reuse | resume | new | recompute
    checkpoint: str  # hash of the denoiser's weights
    channels: dict[str, int]
    wall_s: float
    pixels_per_s: float | None
    workers: int
    device: str = "cpu"
    device_reason: str = ""

    def line(self) -> str:
        levels = {k: v for k, v in self.channels.items() if "_without_" not in k}
        absent = sorted({k.split("_without_", 1)[1] for k in self.channels if "_without_" in k})
        extra = f", and each without {', '.join(absent)}" if absent else ""
        return (f"{FEATURE_STATES[self.state]} features for checkpoint {self.checkpoint}: {levels}{extra} "
                f"({self.wall_s:.1f} s, {self.workers} worker(s), {_device(self)})")


@dataclass
class TrainSummary(_Record):
    seed: int
    epoch: int  # the selected (best-on-val) epoch
    val_oa: float
    val_nll: float
    wall_s: float
    branches: list[str]
    workers: int
    engine: str
    epochs_run: int = 0
    train_oa: float | None = None  # the selected model on every train pixel
    train_nll: float | None = None
    stopped_early: bool = False  # patience ran out before train.epochs
    patience: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    device: str = "cpu"
    device_reason: str = ""

    def line(self) -> str:
        stop = f"stopped early (patience {self.patience})" if self.stopped_early else "ran every epoch"
        return (f"seed {self.seed}: selected epoch {self.epoch} of {self.epochs_run} ({stop}): "
                f"val OA {self.val_oa:.4f} NLL {self.val_nll:.4f}, train OA {_num(self.train_oa, '.4f')} "
                f"NLL {_num(self.train_nll, '.4f')} ({self.workers} worker(s), {self.engine}, {_device(self)}; {self.wall_s:.1f} s)")


@dataclass
class EvalSummary(_Record):
    split: str
    seeds: list[int]
    oa: dict[str, float]  # {"mean", "std"} over seeds
    aa: dict[str, float]
    kappa: dict[str, float]
    branches: dict[str, dict[str, dict[str, float]]]  # branch -> metric -> {"mean", "std"}
    per_seed: dict[str, dict] = field(default_factory=dict)  # seed -> full classification report
    absent: str | None = None  # the modality classified without, if any

    def text(self) -> str:
        def ms(d: dict) -> str:
            return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

        without = f" without {self.absent}" if self.absent else ""
        lines = [f"{self.split}{without} over seeds {self.seeds}: OA {ms(self.oa)}  AA {ms(self.aa)}  kappa {ms(self.kappa)}"]
        for b, d in self.branches.items():
            lines.append(f"  {b:<12} OA {ms(d['oa'])}  AA {ms(d['aa'])}  kappa {ms(d['kappa'])}")
        return "\n".join(lines)


@dataclass
class CVSummary(_Record):
    """Grouped cross-validation of the classifier (``bdgf cv``): one classifier per fold, trained
    on the other folds' regions and scored on the fold's."""

    folds: int
    seed: int
    oa: dict[str, float]  # {"mean", "std"} over folds (sample std, ddof=1)
    aa: dict[str, float]
    kappa: dict[str, float]
    per_fold: list[dict] = field(default_factory=list)  # fold, regions, pixels, oa, aa, kappa, epoch, ...
    regions: int = 0  # labelled regions split into folds
    buffer: int = 0  # px of the ring dropped from a fold's train around its test
    wall_s: float = 0.0

    def text(self) -> str:
        def ms(d: dict) -> str:
            return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

        lines = [f"{self.folds}-fold grouped CV ({self.regions} regions, seed {self.seed}): "
                 f"OA {ms(self.oa)}  AA {ms(self.aa)}  kappa {ms(self.kappa)}  (mean ± sample std over folds)"]
        for f in self.per_fold:
            lines.append(f"  fold {f['fold']}: {f['test_pixels']:>6} test px in {f['test_regions']:>4} regions  "
                         f"OA {100 * f['oa']:.2f}  AA {100 * f['aa']:.2f}  kappa {100 * f['kappa']:.2f}  "
                         f"(epoch {f['epoch']}, val OA {100 * f['val_oa']:.2f})")
        return "\n".join(lines)
