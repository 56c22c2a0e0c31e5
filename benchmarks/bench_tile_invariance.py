"""How much a pixel's diffusion features depend on the tiling: the same pixels computed from two
tilings, before and after the tile-invariant denoiser.

Runs against whichever ``bdgf`` is importable, so the *before* figure comes from the old code:

    git worktree add /tmp/bdgf_before 7688083          # the last commit before the change
    PYTHONPATH=/tmp/bdgf_before .venv/bin/python benchmarks/bench_tile_invariance.py --label before
    .venv/bin/python benchmarks/bench_tile_invariance.py --label after

Setup: a random 33-band scene (HSI 32 + LiDAR 1, standard normal), the demo UNet (base 16, mults
[1, 2, 2]; random weights), one timestep (t = 50) and no noise (x_t = x0, so only the tiling
differs). The 32×32 pixels at rows/cols 64..95 are computed from (a) the 64-px tile at (64, 64)
and (b) the 64-px tile at (32, 32) (both tilings on the stride phase), and (c) a 64-px tile at
(34, 30) (off the stride phase), each seen with the given halo. Where the checkout has a
receptive radius (after), windows are cut as the library cuts them: corner moved down to the
stride phase (the window grows by one phase step); before, the window starts where the halo says. Printed: the relative difference
‖a − b‖ / ‖a‖ per feature level, in %, and the max absolute difference.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def _features(model, scene: torch.Tensor, r0: int, c0: int, side: int, level_maps) -> dict:
    window = scene[:, r0 : r0 + side, c0 : c0 + side][None]
    t = torch.tensor([50])
    with torch.no_grad():
        _, feats = model.forward_with_features(window, t, torch.ones(1, model.config.num_modalities))
    return level_maps(feats, side)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--halos", default="", help="comma-separated halos (default: 16,64, and the receptive radius if known)")
    args = ap.parse_args(argv)
    from bdgf.diffusion.features import level_maps
    from bdgf.diffusion.unet import DenoiserUNet, UNetConfig

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = DenoiserUNet(UNetConfig(33, 2, base_channels=16, channel_mults=(1, 2, 2))).eval()
    radius = getattr(model, "receptive_radius", None)
    halos = [int(h) for h in args.halos.split(",")] if args.halos else sorted({16, 64, *([28] if radius else [])})
    pad = 128
    scene = torch.from_numpy(np.random.default_rng(0).standard_normal((33, 160 + 2 * pad, 160 + 2 * pad)).astype(np.float32))
    T, px = 64, slice(64, 96)
    print(f"# {args.label or 'this checkout'}: receptive radius {radius if radius is not None else 'n/a (window-wide layers)'}")
    print("| halo | tiling | low % | mid % | high % | max abs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for h in halos:
        S = T + 2 * h
        S += (-S) % model.config.tile_multiple

        m = model.config.tile_multiple

        def at(tr, tc):  # features of pixels 64..95 from the tile at (tr, tc)
            r0, c0, side = tr - h, tc - h, S
            if radius is not None:  # the library puts every window corner on the stride phase
                r0, c0, side = (tr - h) // m * m, (tc - h) // m * m, S + m
            f = _features(model, scene, pad + r0, pad + c0, side, level_maps)
            return {k: v[0, :, 64 - r0 : 96 - r0, 64 - c0 : 96 - c0] for k, v in f.items()}

        a = at(64, 64)
        for name, (tr, tc) in (("shifted 32 px", (32, 32)), ("off phase (34, 30)", (34, 30))):
            b = at(tr, tc)
            rel = {k: 100 * float((a[k] - b[k]).norm() / a[k].norm()) for k in a}
            mx = max(float((a[k] - b[k]).abs().max()) for k in a)
            print(f"| {h} | {name} | {rel['low']:.3g} | {rel['mid']:.3g} | {rel['high']:.3g} | {mx:.2e} |")


if __name__ == "__main__":
    main()
