"""Stage 1 of BDGF: the balanced multimodal DDPM (DESIGN §1.2) and its diffusion features (§1.3)."""

from bdgf.diffusion.schedules import NoiseSchedule, ScheduleConfig
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig

__all__ = ["NoiseSchedule", "ScheduleConfig", "DenoiserUNet", "UNetConfig"]
