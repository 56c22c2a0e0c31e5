"""What the stage-2 classifier sees of the data: bands where they are there, and where they are.

Glossary (letters as in docs/glossary.md)
    B   batch (patches or windows)        C   input bands, all modalities concatenated
    M   modalities

The sides of the patch or window are written ``rows, cols``.

A pixel can lack data in two ways: it is nodata in the scene (``valid`` False: NaN, nodata
value, outside the sensor's swath), or a whole modality is absent from the request
(``present`` 0: a scene flown without LiDAR). Both become the same input: the bands of the
missing modality are 0 (the band mean after normalisation) and one availability map per
modality, a_m = valid · present_m, rides along as M extra channels. So a patch with nodata
neighbours is classified from what is there, and the classifier can tell "mean value" from
"no value". The function is per pixel: applying it to a window and then cutting patches equals
cutting patches and then applying it.
"""
from __future__ import annotations

import torch


def classifier_input(x: torch.Tensor, valid: torch.Tensor, present: torch.Tensor,
                     channel_modality: torch.Tensor) -> torch.Tensor:
    """x (B, C, rows, cols) normalised bands, valid (B, rows, cols) bool or 0/1, present (B, M) 0/1,
    channel_modality (C,) int64 modality of each band -> (B, C + M, rows, cols):
    [x where its modality is available else 0 ; availability a (B, M, rows, cols)]."""
    avail = valid[:, None].to(x.dtype) * present[:, :, None, None].to(x.dtype)  # (B, M, rows, cols)
    keep = avail.index_select(1, channel_modality.to(torch.long))  # (B, C, rows, cols)
    return torch.cat([torch.where(keep > 0, x, torch.zeros_like(x)), avail], dim=1)


def input_channels(bands: int, modalities: int) -> int:
    """Channels of ``classifier_input`` for a scene of C = ``bands`` and M = ``modalities``."""
    return bands + modalities
