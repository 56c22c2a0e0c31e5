"""BDGF: Balanced Diffusion-Guided Fusion."""
__version__ = "0.1.0"
