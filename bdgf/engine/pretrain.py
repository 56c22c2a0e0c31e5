"""Stage 1, single process: the balanced multimodal DDPM with adaptive modality masking.

``pretrain_loop`` is the loop itself (model, data, stepper from outside; no global state) and is
what the Ray Train entry point calls too; ``pretrain`` wires it to a scene store and a run dir.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, RandomSampler

from bdgf.config import PretrainConfig, RunConfig
from bdgf.data.scene import Scene
from bdgf.data.tiles import TileDataset, random_augment
from bdgf.diffusion.masking import AdaptiveModalityMasking, MaskingConfig
from bdgf.diffusion.schedules import NoiseSchedule, ScheduleConfig
from bdgf.diffusion.step import diffusion_training_step, unwrap_model
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig
from bdgf.engine.loop import TorchStepper, check_finite, cycle
from bdgf.errors import BDGFError
from bdgf.run import JsonlLogger, Run, atomic_save, read_jsonl


def build_denoiser(cfg: PretrainConfig, bands: list[int]) -> tuple[DenoiserUNet, NoiseSchedule, AdaptiveModalityMasking]:
    """Denoiser, schedule and masking for a scene with the given band count per modality."""
    unet_cfg = UNetConfig(in_channels=sum(bands), num_modalities=len(bands), **cfg.unet)
    if cfg.tile_size % unet_cfg.tile_multiple:
        raise BDGFError(f"pretrain.tile_size {cfg.tile_size} must be a multiple of {unet_cfg.tile_multiple}")
    model = DenoiserUNet(unet_cfg)
    schedule = NoiseSchedule(ScheduleConfig(**cfg.schedule))
    masking = AdaptiveModalityMasking(len(bands), MaskingConfig(**cfg.masking))
    return model, schedule, masking


def denoiser_checkpoint(model, schedule, masking, stepper, step: int, cfg: PretrainConfig,
                        modality_names: list[str], bands: list[int]) -> dict:
    bare = unwrap_model(model)
    return {
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "unet_config": asdict(bare.config),
        "schedule": schedule.state_dict(),
        "masking": masking.state_dict(),
        "stepper": stepper.state_dict() if stepper is not None else None,
        "step": step,
        "config": asdict(cfg),
        "modality_names": list(modality_names),
        "bands": list(bands),
    }


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> tuple[DenoiserUNet, NoiseSchedule, dict]:
    """(frozen eval-mode denoiser, schedule, raw checkpoint) from a denoiser checkpoint."""
    path = Path(path)
    if not path.exists():
        raise BDGFError(f"{path}: no denoiser checkpoint; run `bdgf pretrain` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = DenoiserUNet(UNetConfig(**ckpt["unet_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False).to(device)
    return model, NoiseSchedule.from_state_dict(ckpt["schedule"]), ckpt


def pretrain_loop(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    masking: AdaptiveModalityMasking,
    batches: Iterable[torch.Tensor],
    stepper,
    *,
    steps: int,
    channel_modality: torch.Tensor,
    modality_names: list[str],
    loss_kind: str = "balanced",
    generator: torch.Generator,
    start_step: int = 0,
    log_every: int = 10,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int], None] | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> dict:
    """Run steps ``start_step+1 .. steps``; returns the last step's logs.

    batches: an endless iterator of clean tiles x0 (B, C, T, T). stepper.step(loss) does the
    update. NaN/inf loss stops the loop with TrainingDiverged (no update is applied).
    """
    model.train()
    it = iter(batches)
    logs: dict = {}
    last_good = start_step if start_step > 0 else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start_step, desc="pretrain", unit="step")
    t0, n_seen = time.perf_counter(), 0
    for step in range(start_step + 1, steps + 1):
        x0 = random_augment(next(it), generator).to(device)
        loss, logs = diffusion_training_step(
            model, schedule, masking, x0, channel_modality, generator, loss_kind=loss_kind,
            modality_names=modality_names,
        )
        check_finite(loss, step, last_good, "pretrain")
        stepper.step(loss)
        n_seen += x0.shape[0]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if on_log is not None and (step % log_every == 0 or step == steps):
            dt = time.perf_counter() - t0
            on_log({"step": step, **logs, "tiles_per_s": n_seen / max(dt, 1e-9)})
            t0, n_seen = time.perf_counter(), 0
        if on_checkpoint is not None and ((checkpoint_every and step % checkpoint_every == 0) or step == steps):
            on_checkpoint(step)
            last_good = step
    if bar is not None:
        bar.close()
    return logs


def _most_masked(logs: dict, names: list[str]) -> str:
    """The modality with the highest final masking probability, or "none (equal)"."""
    p = {n: round(logs.get(f"p_mask/{n}", 0.0), 3) for n in names}
    top = max(p.values()) if p else 0.0
    leaders = [n for n in names if p[n] == top]
    return leaders[0] if len(leaders) == 1 else "none (equal)"


def tile_loader(store: str | Path, cfg: PretrainConfig, num_samples: int, seed: int) -> DataLoader:
    data = TileDataset(store, cfg.tile_size)
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(data, replacement=True, num_samples=num_samples, generator=g)
    return DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)


def pretrain(store: str | Path, run_dir: str | Path, config: RunConfig | None = None, *,
             resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Pretrain the denoiser on a scene store into ``run_dir``; returns a summary dict."""
    scene = Scene.open(store)
    run = Run(run_dir)
    if resume and run.denoiser_path.exists():
        run.check_scene(scene)
        config = run.config()
    else:
        config = config or RunConfig()
        run.create(scene, config, overwrite=overwrite)
    cfg = config.pretrain
    torch.manual_seed(cfg.seed)
    names = scene.modality_names
    bands = [scene.bands[n] for n in names]
    model, schedule, masking = build_denoiser(cfg, bands)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stepper = TorchStepper(model, optimizer, cfg.grad_clip)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume and run.denoiser_path.exists():
        ckpt = torch.load(run.denoiser_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        masking.load_state_dict(ckpt["masking"])
        if ckpt.get("stepper"):
            stepper.load_state_dict(ckpt["stepper"])
        start = int(ckpt["step"])
        generator.manual_seed(cfg.seed + start)
    channel_modality = torch.as_tensor(scene.channel_modality)
    logger = JsonlLogger(run.stage_dir("pretrain") / "log.jsonl", append=start > 0)

    def save(step: int) -> None:
        atomic_save(denoiser_checkpoint(model, schedule, masking, stepper, step, cfg, names, bands), run.denoiser_path)

    loader = tile_loader(store, cfg, num_samples=max(cfg.steps - start, 1) * cfg.batch_size, seed=cfg.seed + start)
    t0 = time.perf_counter()
    try:
        last = pretrain_loop(
            model, schedule, masking, cycle(loader), stepper, steps=cfg.steps, channel_modality=channel_modality,
            modality_names=names, loss_kind=cfg.loss_kind, generator=generator, start_step=start,
            log_every=cfg.log_every, on_log=logger, checkpoint_every=cfg.checkpoint_every,
            on_checkpoint=save, progress=progress,
        )
    finally:
        logger.close()
    wall = time.perf_counter() - t0
    from bdgf.plots import plot_pretrain_curves

    plot_pretrain_curves(read_jsonl(run.path / "pretrain" / "log.jsonl"), run.path / "pretrain" / "curves.png")
    summary = {
        "steps": cfg.steps,
        "final_loss": last.get("loss"),
        "loss_per_modality": {n: last.get(f"loss/{n}") for n in names},
        "p_mask": {n: last.get(f"p_mask/{n}") for n in names},
        "most_masked": _most_masked(last, names),
        "wall_s": wall,
        "tiles_per_s": (cfg.steps - start) * cfg.batch_size / max(wall, 1e-9),
    }
    run.record("pretrain", summary)
    return summary
