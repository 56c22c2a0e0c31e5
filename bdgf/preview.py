"""PNG preview of a scene: false-colour HSI, elevation, and labels side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdgf.data.scene import Scene

MAX_PREVIEW_PIXELS = 1024  # longest side drawn; larger scenes are read with a stride


def _stride(scene: Scene) -> int:
    return max(1, int(np.ceil(max(scene.shape) / MAX_PREVIEW_PIXELS)))


def _stretch(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-channel 2–98 % percentile stretch to [0, 1]; img (..., H, W)."""
    out = np.zeros_like(img, dtype=np.float32)
    for i in range(img.shape[0]):
        v = img[i][valid]
        lo, hi = (np.percentile(v, [2, 98]) if v.size else (0.0, 1.0))
        out[i] = np.clip((img[i] - lo) / max(hi - lo, 1e-12), 0, 1)
    return out


def false_colour_bands(scene: Scene, name: str) -> list[int]:
    """Three band indices for an RGB composite: nearest to 650/550/450 nm when wavelengths are
    known (or to the NIR/red/green where the sensor starts above 450), else evenly spaced."""
    meta = scene.modality_meta(name)
    if meta.bands < 3:
        return [0, 0, 0]
    if meta.wavelengths_nm:
        wl = np.asarray(meta.wavelengths_nm)
        return [int(np.abs(wl - target).argmin()) for target in (650.0, 550.0, 450.0)]
    return [int(round(x)) for x in np.linspace(meta.bands - 1, 0, 3)]


def _elevation_modality(scene: Scene) -> str | None:
    for kind in ("lidar", "dsm", "sar"):
        for m in scene.meta.modalities:
            if m.kind == kind:
                return m.name
    others = scene.modality_names[1:]
    return others[0] if others else None


def save_preview(scene: Scene, out: str | Path, prediction: np.ndarray | None = None) -> Path:
    """Write a PNG with false-colour HSI, elevation (or SAR), ground truth (and a prediction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = _stride(scene)
    valid = scene.valid[::s, ::s]
    first = scene.modality_names[0]
    rgb = np.asarray(scene.modality(first)[false_colour_bands(scene, first), ::s, ::s], np.float32)
    panels = [("false colour " + first, np.moveaxis(_stretch(rgb, valid), 0, -1), None)]
    elev = _elevation_modality(scene)
    if elev is not None:
        e = np.asarray(scene.modality(elev)[0:1, ::s, ::s], np.float32)
        panels.append((f"{elev} band 0", _stretch(e, valid)[0], "viridis"))
    gt = np.zeros(scene.shape, np.int64)
    for split in scene.splits:
        lab = scene.labels(split)
        gt = np.where(gt == 0, lab, gt)
    k = scene.num_classes
    cmap = plt.get_cmap("tab20", max(k, 2)).copy()
    panels.append(("labels (all splits)", np.ma.masked_equal(gt[::s, ::s], 0), cmap))
    if prediction is not None:
        panels.append(("prediction", np.ma.masked_equal(prediction[::s, ::s], 0), cmap))
    h, w = valid.shape
    fig_w = 4.0 * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(fig_w, 4.0 * h / w + 0.8), squeeze=False)
    for ax, (title, img, cm) in zip(axes[0], panels):
        kwargs = {"vmin": 1, "vmax": max(k, 2), "interpolation": "nearest"} if cm is cmap else {}
        ax.imshow(img, cmap=cm, **kwargs)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap((i) / max(k - 1, 1))) for i in range(k)]
    fig.legend(handles, scene.class_names, loc="lower center", ncol=min(k, 8), fontsize=7, frameon=False)
    fig.suptitle(f"{scene.name} ({scene.shape[0]}x{scene.shape[1]})", fontsize=10)
    return _save_png(plt, fig, out)


def _save_png(plt, fig, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` atomically (a temporary file, then a rename) and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out


def save_class_map(map_zarr: str | Path, out: str | Path, classes: dict, max_side: int = 2048) -> Path:
    """A PNG of a bulk map's ``classes`` (``bdgf classify``'s Zarr output) in the package's class
    colours (``classes``: the manifest's {"names", "colours"}), nodata black, read with a stride so
    that the longer side is at most ``max_side`` px (memory bounded by the PNG, not the map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    arr = zarr.open_group(str(map_zarr), mode="r")["classes"]
    H, W = arr.shape
    s = max(1, -(-max(H, W) // max_side))
    cls = np.asarray(arr[::s, ::s])
    palette = np.zeros((len(classes["colours"]) + 1, 3), np.uint8)  # 0 = nodata: black
    palette[1:] = np.asarray(classes["colours"], np.uint8)
    img = palette[np.clip(cls, 0, len(palette) - 1)]
    fig, ax = plt.subplots(figsize=(6.0, 6.0 * cls.shape[0] / cls.shape[1] + 0.6))
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{Path(map_zarr).name}: {H}x{W} px" + (f" (every {s}th px)" if s > 1 else ""), fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i + 1] / 255.0) for i in range(len(classes["names"]))]
    fig.legend(handles, classes["names"], loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    return _save_png(plt, fig, out)
