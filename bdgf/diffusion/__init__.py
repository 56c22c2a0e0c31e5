"""Stage 1 of BDGF: the balanced multimodal DDPM and its diffusion features (docs/method.md).

Modules: ``schedules`` (NoiseSchedule), ``unet`` (DenoiserUNet), ``masking``
(AdaptiveModalityMasking), ``loss`` (balanced_loss, concat_mse), ``step``
(diffusion_training_step; imports kernels.dispatch, so it is not imported here eagerly).
"""

from bdgf.diffusion.loss import balanced_loss, concat_mse
from bdgf.diffusion.masking import AdaptiveModalityMasking, MaskingConfig
from bdgf.diffusion.schedules import NoiseSchedule, ScheduleConfig
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig

__all__ = [
    "NoiseSchedule", "ScheduleConfig", "DenoiserUNet", "UNetConfig", "AdaptiveModalityMasking",
    "MaskingConfig", "balanced_loss", "concat_mse", "diffusion_training_step",
]


def __getattr__(name):
    if name == "diffusion_training_step":
        from bdgf.diffusion.step import diffusion_training_step

        return diffusion_training_step
    raise AttributeError(f"module 'bdgf.diffusion' has no attribute {name!r}")
