"""Deterministic synthetic scenes with real structure: a land-cover layout, physically shaped
spectra, an elevation model and (optionally) SAR backscatter, all on one 1 m grid.

>>> scene = make_scene("demo", seed=0)          # SceneData, ready for write_scene
>>> truth = make_class_map("demo", seed=0)      # (H, W) full class map 1..K (every pixel)

Glossary (letters as in docs/glossary.md): H×W grid, C_m HSI bands, K classes, J within-class modes.

How a scene is made (every step draws from its own seeded numpy Generator stream, so the same
(preset, seed) gives bit-identical arrays, and another seed another scene):

1. **Layout** (H, W): warped Voronoi cells for natural cover (grass, trees, soil, water), straight
   roads of a few pixels' width, and non-overlapping rectangles (buildings, parking lots), each
   class given at least the pixels its labels need (the layout is redrawn otherwise).
2. **HSI** (B, H, W) reflectance, 400–1000 nm: each class has a *material* whose spectrum is a sum
   of smooth terms (green peak, chlorophyll well, red edge, soil slope, water absorption),
   integrated over Gaussian band responses; within-class variability is a per-material set of J
   smooth spectral modes whose coefficients are spatially correlated fields, times a smooth
   illumination field; plus band-dependent Gaussian sensor noise.
3. **Elevation** (1, H, W) DSM in metres (2 bands with LiDAR intensity where the preset asks):
   terrain = plane + smooth relief; ground classes sit on it; water is flat per water body;
   trees get a rough canopy within their height range; buildings are flat-topped rectangles with a
   height per building (area-stratified over the class range), so their edges are sharp; plus
   white sensor noise and, where the preset asks, a spatially correlated error whose std varies
   across the scene (``elevation_error_std``).
4. **SAR** (4, H, W) in dB where the preset asks: a class mean backscatter per polarisation
   (VV, VH, HH, HV: specular water, rough surfaces, volume scattering of canopy, double bounce of
   buildings), multiplied by gamma speckle of ``sar_looks`` looks, then 10·log10.
5. **Labels**: pixels off class boundaries inside smooth "surveyed" blobs form the labelled subset;
   ``train_per_class`` pixels per class (in small clusters where asked) are drawn for ``train``,
   then ``val_per_class`` for ``val`` only among labelled pixels farther than the patch radius
   (5 px, Chebyshev) from every train pixel (``val_split="regions"``, the default; ``blocks``:
   one compact block per class; ``random``: the old draw, train + val together and val carved at
   random, so val sits next to train); the rest of the labelled subset is ``test``. So ``train``
   holds exactly ``train_per_class`` pixels and ``val`` exactly ``val_per_class`` of every class.

Presets (``PRESETS``):

- ``tiny`` 48×48, HSI 16 + LiDAR 1, 4 classes (grass, trees, building, road), 12 train / 3 val
  per class: unit tests.
- ``demo`` 128×128, HSI 32 + LiDAR 1, 6 classes (grass, trees, water, road, building_low,
  building_high), 30 train / 8 val per class in clusters of 4: ``make demo``.
- ``imbalance`` 128×128, HSI 80 high-SNR bands + LiDAR 1, 8 classes (grass, trees, soil, water,
  road, parking_lot, roof_concrete, roof_metal), exactly 20 train / 5 val per class. Designed so
  that neither modality alone separates every class (``IMBALANCE_HSI_CONFUSABLE``,
  ``IMBALANCE_ELEVATION_CONFUSABLE``):

  * elevation-only separable (same material, so the same spectrum and the same within-class
    variability; different height): ``grass`` vs ``trees`` (one leaf spectrum; lawn at 0 m,
    canopy 5–15 m) and ``parking_lot`` vs ``roof_concrete`` (one concrete, both rectangles;
    ground vs flat roof 5–12 m);
  * HSI-only separable (same height model, different material): ``road`` (asphalt) vs
    ``parking_lot`` (concrete), ``grass`` vs ``soil`` (both at ground; terrain kept nearly flat
    so location does not leak through elevation), and ``roof_concrete`` vs ``roof_metal`` (both
    rectangles, roof heights area-stratified over the same 5–12 m).

  Measured with a nearest-class-mean classifier (means from train + val, balanced accuracy on
  test) over seeds 0–29: the confusable modality scores ~0.53 on average (at most ~0.76, the roof
  pair, as a class has only a handful of buildings), the other modality ≥ 0.98.

- ``hard`` 128×128, HSI 32 noisier bands (noise 0.006, within-class variability 1.5×) + LiDAR 1,
  9 classes (grass, shrubs, trees, soil, water, road, parking_lot, roof_concrete, roof_coated),
  exactly 10 train / 3 val per class: the ablation benchmark's preset, built so that the imbalance
  preset's saturation (every variant 95–97 %) does not recur (``HARD_HSI_CONFUSABLE``,
  ``HARD_ELEVATION_CONFUSABLE``):

  * elevation-only separable: ``grass`` vs ``shrubs`` (one leaf spectrum; lawn vs 1.5–4 m) and
    ``parking_lot`` vs ``roof_concrete`` (one concrete; ground vs flat roof 3–8 m);
  * HSI-only separable: ``road`` vs ``parking_lot``, ``grass`` vs ``soil``, and the spectrally
    *close* ``roof_concrete`` vs ``roof_coated`` (concrete with a bluish, NIR-dark coating; both
    roofs 3–8 m);
  * the LiDAR's usefulness varies across the scene: a spatially correlated height error
    (correlation length 3 px, so a patch does not average it away) whose std is 0 on the left
    40 % of the columns and rises linearly to 6 m at the right edge (``elevation_error_std``).
    Where it is large, the elevation-only pairs are confusable in *both* modalities.

  Measured (tests/test_synthetic.py, NCM with class means from another scene of the preset,
  seeds 0–5): where the LiDAR is clean the confusable modality scores ~0.5 per pair (a roof pair
  can separate by chance in one seed: a part holds few buildings), the other > 0.85 (HSI on the
  close roof pair 0.86–0.99); in the degraded part elevation on grass / shrubs falls from > 0.9
  to 0.58–0.75.

- ``sar`` 64×64, HSI 24 + SAR 4 (dB) + DSM 1 (three modalities, Augsburg-like), 7 classes (grass,
  trees, soil, water, road, building_low, building_high),
  15 train / 4 val per class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

import numpy as np
from scipy import ndimage

from bdgf.data.scene import ModalityData, SceneData
from bdgf.data.splits import DEFAULT_BUFFER, DISTANCE_METRIC, VAL_METHODS, carve_val, min_distance, regions
from bdgf.errors import InputError

# ----------------------------------------------------------------------------------------
# Configuration (plain data)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSpec:
    """One land-cover class: what it is made of, where it lies, how high it stands."""

    name: str
    material: str  # key of MATERIALS: the HSI reflectance
    layer: str  # "cell" (Voronoi region) | "line" (road) | "rect" (building, lot)
    height: str = "ground"  # "ground" | "water" | "canopy" | "flat"
    height_range: tuple[float, float] = (0.0, 0.0)  # metres above terrain (canopy, flat)
    scattering: str = "surface"  # key of SAR_SIGNATURES


@dataclass(frozen=True)
class SceneConfig:
    """A synthetic scene preset. Sizes in pixels (1 m ground sampling)."""

    name: str
    height: int
    width: int
    classes: tuple[ClassSpec, ...]
    hsi_bands: int
    wavelength_range: tuple[float, float] = (400.0, 1000.0)
    hsi_noise: float = 0.004  # sensor noise std (reflectance) at 700 nm; larger at the ends
    variability: float = 1.0  # scale of within-class spectral modes and illumination
    n_modes: int = 3  # J within-class spectral modes per material
    variability_scale: float = 1.0  # correlation length (px) of the within-class mode coefficients
    lidar_bands: int = 1  # 1: DSM; 2: DSM + intensity
    elevation_name: str = "lidar"  # modality name of the elevation raster
    elevation_kind: str = "lidar"  # "lidar" | "dsm"
    elevation_noise: float = 0.05  # LiDAR noise std, metres
    # Spatially varying LiDAR quality: a spatially correlated height error whose std grows
    # linearly from 0 at column fraction ``elevation_error_from`` to ``elevation_error`` metres at
    # the right edge (0: the same quality everywhere). See ``elevation_error_std``.
    elevation_error: float = 0.0
    elevation_error_from: float = 0.4
    elevation_error_scale: float = 2.0  # correlation length of the error, px
    terrain_slope: float = 0.006  # largest terrain gradient, m/px
    terrain_relief: float = 0.25  # std of smooth terrain relief, metres
    ground_roughness: float = 0.08  # micro-relief std of ground-level surfaces, metres
    sar: bool = False
    sar_looks: float = 4.0
    cell_area: float = 400.0  # mean Voronoi cell area (px)
    lines_per_class: int = 1
    line_width: tuple[float, float] = (3.0, 5.0)
    rects_per_class: int = 4
    rect_size: tuple[int, int] = (6, 16)
    label_fraction: float = 0.6  # share of the grid inside surveyed blobs
    train_per_class: int = 12
    val_per_class: int = 3
    train_cluster: int = 1  # training pixels are drawn in clusters of this many

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


def _c(name, material, layer, height="ground", hr=(0.0, 0.0), scattering="surface") -> ClassSpec:
    return ClassSpec(name, material, layer, height, hr, scattering)


GRASS = _c("grass", "grass", "cell", scattering="grass")
TREES = _c("trees", "tree_canopy", "cell", "canopy", (5.0, 15.0), "volume")
SOIL = _c("soil", "soil", "cell")
WATER = _c("water", "water", "cell", "water", scattering="specular")
ROAD = _c("road", "asphalt", "line")
BUILDING = _c("building", "concrete", "rect", "flat", (5.0, 14.0), "double_bounce_low")
BUILDING_LOW = _c("building_low", "roof_tile", "rect", "flat", (3.0, 8.0), "double_bounce_low")
BUILDING_HIGH = _c("building_high", "concrete", "rect", "flat", (15.0, 30.0), "double_bounce_high")

PRESETS: dict[str, SceneConfig] = {
    "tiny": SceneConfig(
        name="tiny", height=48, width=48, hsi_bands=16,
        classes=(GRASS, TREES, BUILDING, ROAD),
        cell_area=300.0, rects_per_class=3, rect_size=(7, 13), line_width=(3.0, 4.0),
        train_per_class=12, val_per_class=3, label_fraction=0.7,
    ),
    "demo": SceneConfig(
        name="demo", height=128, width=128, hsi_bands=32,
        classes=(GRASS, TREES, WATER, ROAD, BUILDING_LOW, BUILDING_HIGH),
        cell_area=500.0, lines_per_class=2, rects_per_class=6, rect_size=(7, 18),
        train_per_class=30, val_per_class=8, train_cluster=4,
    ),
    "imbalance": SceneConfig(
        name="imbalance", height=128, width=128, hsi_bands=80, hsi_noise=0.002,
        terrain_slope=0.001, terrain_relief=0.05, ground_roughness=0.15,
        classes=(
            _c("grass", "vegetation", "cell", scattering="grass"),
            _c("trees", "vegetation", "cell", "canopy", (5.0, 15.0), "volume"),
            SOIL,
            WATER,
            ROAD,
            _c("parking_lot", "concrete", "rect"),
            _c("roof_concrete", "concrete", "rect", "flat", (5.0, 12.0), "double_bounce_low"),
            _c("roof_metal", "metal_roof", "rect", "flat", (5.0, 12.0), "double_bounce_low"),
        ),
        cell_area=450.0, lines_per_class=2, rects_per_class=7, rect_size=(7, 15),
        train_per_class=20, val_per_class=5,
    ),
    "hard": SceneConfig(
        name="hard", height=128, width=128, hsi_bands=32, hsi_noise=0.006, variability=1.5,
        terrain_slope=0.001, terrain_relief=0.05, ground_roughness=0.15,
        elevation_error=6.0, elevation_error_from=0.4, elevation_error_scale=3.0,
        classes=(
            _c("grass", "vegetation", "cell", scattering="grass"),
            _c("shrubs", "vegetation", "cell", "canopy", (1.5, 4.0), "volume"),
            TREES,
            SOIL,
            WATER,
            ROAD,
            _c("parking_lot", "concrete", "rect"),
            _c("roof_concrete", "concrete", "rect", "flat", (3.0, 8.0), "double_bounce_low"),
            _c("roof_coated", "coated_concrete", "rect", "flat", (3.0, 8.0), "double_bounce_low"),
        ),
        cell_area=450.0, lines_per_class=2, rects_per_class=7, rect_size=(7, 14),
        train_per_class=10, val_per_class=3,
    ),
    "sar": SceneConfig(
        name="sar", height=64, width=64, hsi_bands=24, sar=True,
        elevation_name="dsm", elevation_kind="dsm",
        classes=(GRASS, TREES, SOIL, WATER, ROAD, BUILDING_LOW, BUILDING_HIGH),
        cell_area=350.0, rects_per_class=3, rect_size=(7, 13), line_width=(3.0, 4.0),
        train_per_class=15, val_per_class=4, label_fraction=0.7,
    ),
}

# The imbalance preset's designed pairs (class names), measured by tests/test_synthetic.py.
IMBALANCE_HSI_CONFUSABLE = (("grass", "trees"), ("parking_lot", "roof_concrete"))  # elevation separates
IMBALANCE_ELEVATION_CONFUSABLE = (("road", "parking_lot"), ("grass", "soil"), ("roof_concrete", "roof_metal"))
# The hard preset's designed pairs; elevation separates its HSI-confusable pairs only where the
# LiDAR is good (left of ``elevation_error_from``), see ``elevation_error_std``.
HARD_HSI_CONFUSABLE = (("grass", "shrubs"), ("parking_lot", "roof_concrete"))
HARD_ELEVATION_CONFUSABLE = (("road", "parking_lot"), ("grass", "soil"), ("roof_concrete", "roof_coated"))

# Reflectance spectra as sums of smooth terms over wavelength λ (nm):
# ("const", a) | ("linear", a): a·(λ−400)/600 | ("gauss", a, centre, width) |
# ("sigmoid", a, centre, width) | ("exp", a, start, scale): a·exp(−(λ−start)/scale)
_LEAF = (
    ("const", 0.03), ("gauss", 0.06, 550.0, 35.0), ("gauss", -0.02, 675.0, 20.0),
    ("sigmoid", 0.40, 715.0, 14.0), ("gauss", -0.04, 975.0, 30.0),
)
MATERIALS: dict[str, tuple[tuple, ...]] = {
    "grass": _LEAF,
    "vegetation": _LEAF,  # shared leaf spectrum (imbalance: grass and trees)
    "tree_canopy": (
        ("const", 0.02), ("gauss", 0.04, 550.0, 30.0), ("gauss", -0.01, 675.0, 20.0),
        ("sigmoid", 0.30, 720.0, 16.0), ("gauss", -0.05, 970.0, 35.0),
    ),
    "soil": (("const", 0.07), ("linear", 0.22), ("gauss", -0.03, 900.0, 80.0), ("gauss", 0.015, 600.0, 60.0)),
    "asphalt": (("const", 0.06), ("linear", 0.04)),
    "concrete": (("const", 0.22), ("linear", 0.08), ("gauss", -0.03, 430.0, 50.0)),
    "coated_concrete": (("const", 0.20), ("linear", 0.08), ("gauss", -0.03, 430.0, 50.0), ("gauss", 0.08, 480.0, 50.0),
                        ("sigmoid", -0.08, 760.0, 40.0)),  # concrete with a bluish, NIR-dark coating
    "metal_roof": (("const", 0.16), ("gauss", 0.14, 470.0, 60.0), ("sigmoid", 0.10, 800.0, 40.0)),
    "roof_tile": (("const", 0.07), ("sigmoid", 0.25, 590.0, 20.0), ("linear", 0.05)),
    "water": (("const", 0.005), ("exp", 0.07, 400.0, 120.0), ("gauss", 0.015, 560.0, 40.0)),
}

# Mean linear backscatter (σ0) per polarisation VV, VH, HH, HV.
SAR_BANDS = ("VV", "VH", "HH", "HV")
SAR_SIGNATURES: dict[str, tuple[float, float, float, float]] = {
    "specular": (0.004, 0.0006, 0.003, 0.0006),
    "surface": (0.03, 0.004, 0.025, 0.004),
    "grass": (0.06, 0.012, 0.055, 0.012),
    "volume": (0.12, 0.035, 0.11, 0.035),
    "double_bounce_low": (0.35, 0.04, 0.5, 0.04),
    "double_bounce_high": (0.8, 0.08, 1.2, 0.08),
}

# Generator streams: one per stage, so stages never shift each other's draws.
_LAYOUT, _ELEVATION, _HSI, _SAR, _LABELS = range(5)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def get_config(preset: Union[str, SceneConfig]) -> SceneConfig:
    """The SceneConfig of a preset name (or the config itself)."""
    if isinstance(preset, SceneConfig):
        return preset
    if preset not in PRESETS:
        raise InputError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------
# Spatial helpers
# ----------------------------------------------------------------------------------------


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """(H, W) smooth Gaussian random field, zero mean, unit std, correlation length ~sigma px."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def interior(class_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose 4 neighbours share their class (grid edges count as same)."""
    p = np.pad(class_map, 1, mode="edge")
    c = p[1:-1, 1:-1]
    return (p[:-2, 1:-1] == c) & (p[2:, 1:-1] == c) & (p[1:-1, :-2] == c) & (p[1:-1, 2:] == c)


# ----------------------------------------------------------------------------------------
# 1. Layout
# ----------------------------------------------------------------------------------------


def _voronoi(cfg: SceneConfig, rng: np.random.Generator, cell_ids: list[int]) -> np.ndarray:
    """(H, W) class ids from warped Voronoi cells; every id in ``cell_ids`` gets a cell."""
    h, w = cfg.height, cfg.width
    n = max(len(cell_ids), int(round(h * w / cfg.cell_area)))
    assign = np.array(cell_ids * (n // len(cell_ids) + 1))[:n]
    assign = rng.permutation(assign)
    pts = rng.uniform((0, 0), (h, w), size=(n, 2))
    radius = np.sqrt(cfg.cell_area)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy += 0.3 * radius * _field(rng, (h, w), radius / 2)
    xx += 0.3 * radius * _field(rng, (h, w), radius / 2)
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    return assign[np.argmin(d2, axis=-1)]


def _line(cfg: SceneConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: a straight road through the grid, mostly axis-aligned."""
    h, w = cfg.height, cfg.width
    base = rng.choice([0.0, 0.5 * np.pi])
    theta = base + rng.normal(0.0, 0.15)
    y0, x0 = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    width = rng.uniform(*cfg.line_width)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.abs((yy - y0) * np.cos(theta) - (xx - x0) * np.sin(theta))
    return dist < width / 2


def _place_rect(cfg: SceneConfig, rng: np.random.Generator, occupied: np.ndarray) -> tuple[slice, slice] | None:
    """A free rectangle (1 px margin from anything occupied), or None after 60 tries."""
    h, w = cfg.height, cfg.width
    lo, hi = cfg.rect_size
    for _ in range(60):
        rh, rw = rng.integers(lo, hi + 1, size=2)
        r0, c0 = rng.integers(1, h - rh), rng.integers(1, w - rw)
        if not occupied[r0 - 1 : r0 + rh + 1, c0 - 1 : c0 + rw + 1].any():
            return slice(r0, r0 + rh), slice(c0, c0 + rw)
    return None


def _layout_once(cfg: SceneConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W) int64 class map 1..K: cells, then roads over them, then rectangles."""
    ids = {layer: [k for k, c in enumerate(cfg.classes, 1) if c.layer == layer] for layer in ("cell", "line", "rect")}
    if not ids["cell"]:
        raise InputError(f"preset {cfg.name!r}: needs at least one 'cell' class for the background")
    cmap = _voronoi(cfg, rng, ids["cell"])
    occupied = np.zeros(cmap.shape, bool)
    for k in ids["line"]:
        for _ in range(cfg.lines_per_class):
            road = _line(cfg, rng)
            cmap[road] = k
            occupied |= road
    for _ in range(cfg.rects_per_class):  # round robin so every rect class is placed
        for k in ids["rect"]:
            box = _place_rect(cfg, rng, occupied)
            if box is not None:
                cmap[box] = k
                occupied[box] = True
    return cmap


def _needed(cfg: SceneConfig) -> int:
    """Interior pixels each class needs: train + val and at least as many again for test."""
    return 2 * (cfg.train_per_class + cfg.val_per_class)


def _layout(cfg: SceneConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W) class map where every class has enough interior pixels (redrawn up to 30 times)."""
    k = len(cfg.classes)
    for _ in range(30):
        cmap = _layout_once(cfg, rng)
        counts = np.bincount(cmap[interior(cmap)], minlength=k + 1)[1:]
        if counts.min() >= _needed(cfg):
            return cmap
    raise InputError(f"preset {cfg.name!r}: grid too small for {k} classes with {_needed(cfg)} interior pixels each")


def make_class_map(preset: Union[str, SceneConfig], seed: int) -> np.ndarray:
    """(H, W) int64 full ground truth 1..K of the scene ``make_scene(preset, seed)`` draws."""
    cfg = get_config(preset)
    return _layout(cfg, _rng(seed, _LAYOUT))


# ----------------------------------------------------------------------------------------
# 2. Hyperspectral
# ----------------------------------------------------------------------------------------


def _eval_terms(terms: tuple[tuple, ...], lam: np.ndarray) -> np.ndarray:
    """(F,) reflectance of one material on wavelengths ``lam`` (F,) nm."""
    out = np.zeros_like(lam)
    for term in terms:
        kind, a, *p = term
        if kind == "const":
            out += a
        elif kind == "linear":
            out += a * (lam - 400.0) / 600.0
        elif kind == "gauss":
            out += a * np.exp(-0.5 * ((lam - p[0]) / p[1]) ** 2)
        elif kind == "sigmoid":
            out += a / (1.0 + np.exp(-(lam - p[0]) / p[1]))
        elif kind == "exp":
            out += a * np.exp(-(lam - p[0]) / p[1])
        else:
            raise InputError(f"unknown spectral term {kind!r}")
    return out


def band_response(cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres (B,), fine grid (F,), response (B, F)): Gaussian bands, FWHM = band spacing."""
    lo, hi = cfg.wavelength_range
    centres = np.linspace(lo, hi, cfg.hsi_bands)
    spacing = (hi - lo) / max(cfg.hsi_bands - 1, 1)
    sigma = max(spacing, 5.0) / 2.355
    fine = np.arange(lo - 4 * sigma, hi + 4 * sigma + 1.0, 1.0)
    resp = np.exp(-0.5 * ((fine[None] - centres[:, None]) / sigma) ** 2)
    return centres, fine, resp / resp.sum(axis=1, keepdims=True)


def material_spectra(cfg: SceneConfig) -> dict[str, np.ndarray]:
    """{material: (B,) mean reflectance as the sensor sees it} for the preset's materials."""
    _, fine, resp = band_response(cfg)
    return {m: resp @ _eval_terms(MATERIALS[m], fine) for m in sorted({c.material for c in cfg.classes})}


def _modes(cfg: SceneConfig, rng: np.random.Generator, spectrum: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(J, B) smooth within-class spectral modes of one material, scaled to its brightness."""
    lo, hi = cfg.wavelength_range
    amps = cfg.variability * np.array([0.10, 0.06, 0.03, 0.02, 0.01])[: cfg.n_modes] * spectrum.mean()
    out = np.zeros((cfg.n_modes, centres.size))
    for j in range(cfg.n_modes):
        for _ in range(2):
            c, width, sign = rng.uniform(lo, hi), rng.uniform(60.0, 250.0), rng.choice([-1.0, 1.0])
            out[j] += sign * np.exp(-0.5 * ((centres - c) / width) ** 2)
        out[j] *= amps[j] / (np.abs(out[j]).max() + 1e-12)
    return out


def _hsi(cfg: SceneConfig, cmap: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(HSI (B, H, W) float32 reflectance, band centres (B,) nm)."""
    centres, _, _ = band_response(cfg)
    spectra = material_spectra(cfg)
    shape = cmap.shape
    coeff = np.stack([_field(rng, shape, cfg.variability_scale) for _ in range(cfg.n_modes)])  # (J, H, W)
    bright = 1.0 + 0.06 * cfg.variability * _field(rng, shape, cfg.variability_scale)  # (H, W)
    mat_of_class = np.array([""] + [c.material for c in cfg.classes], dtype=object)
    out = np.zeros((cfg.hsi_bands,) + shape)
    for m, spec in spectra.items():
        modes = _modes(cfg, rng, spec, centres)  # (J, B)
        sel = mat_of_class[cmap] == m  # (H, W)
        px = spec[:, None] + modes.T @ coeff[:, sel]  # (B, N)
        out[:, sel] = px * bright[sel]
    noise_std = cfg.hsi_noise * (1.0 + 1.5 * ((centres - 700.0) / 300.0) ** 2)
    out += noise_std[:, None, None] * rng.standard_normal(out.shape)
    return out.astype(np.float32), centres


# ----------------------------------------------------------------------------------------
# 3. Elevation
# ----------------------------------------------------------------------------------------


def _terrain(cfg: SceneConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W) metres: a gentle plane (≤ terrain_slope m/px) plus smooth relief (std terrain_relief)."""
    h, w = cfg.height, cfg.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    gy, gx = rng.uniform(-cfg.terrain_slope, cfg.terrain_slope, size=2)
    return gy * yy + gx * xx + cfg.terrain_relief * _field(rng, (h, w), max(h, w) / 6)


def _flat_tops(cfg: SceneConfig, comps: dict[int, np.ndarray], rng: np.random.Generator) -> dict[int, np.ndarray]:
    """{class k: (n_k,) roof height per component} for "flat" classes.

    Area-stratified per class: in a random order of its buildings, each takes the height at the
    centre of its share of the class's roof area, so the class's roof pixels spread evenly over
    its height range whatever the building sizes; two classes with the same range then have
    matching height distributions and elevation alone cannot tell them apart."""
    out = {}
    for k, spec in enumerate(cfg.classes, 1):
        if spec.height == "flat":
            area = np.bincount(comps[k].ravel())[1:].astype(np.float64)
            order = rng.permutation(area.size)
            cum = np.cumsum(area[order])
            centre = np.empty_like(area)
            centre[order] = (cum - area[order] / 2) / max(cum[-1], 1.0) if area.size else 0.0
            lo, hi = spec.height_range
            out[k] = lo + (hi - lo) * centre
    return out


def _heights(cfg: SceneConfig, cmap: np.ndarray, terrain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) DSM in metres without sensor noise: terrain plus each class's object height."""
    dsm = terrain + cfg.ground_roughness * rng.standard_normal(cmap.shape)
    rough = _field(rng, cmap.shape, 1.2)
    comps = {k: ndimage.label(cmap == k)[0] for k in range(1, len(cfg.classes) + 1)}
    tops = _flat_tops(cfg, comps, rng)
    for k, spec in enumerate(cfg.classes, 1):
        lab = comps[k]
        sel = lab > 0
        n = int(lab.max())
        if n == 0:
            continue
        lo, hi = spec.height_range
        idx = np.arange(1, n + 1)
        if spec.height == "water":  # flat surface at the lowest terrain of each water body
            dsm[sel] = np.asarray(ndimage.minimum(terrain, lab, idx))[lab[sel] - 1]
        elif spec.height == "flat":  # flat roof: terrain at the footprint's centre + height
            dsm[sel] = (np.asarray(ndimage.mean(terrain, lab, idx)) + tops[k])[lab[sel] - 1]
        elif spec.height == "canopy":  # rough canopy, mean height per stand
            base = lo + (hi - lo) * (0.3 + 0.4 * (rng.permutation(n) + rng.uniform(size=n)) / n)
            canopy = base[lab[sel] - 1] + 0.2 * (hi - lo) * rough[sel] + 0.5 * rng.standard_normal(sel.sum())
            dsm[sel] = terrain[sel] + np.clip(canopy, lo, hi)
        elif spec.height != "ground":
            raise InputError(f"class {spec.name!r}: unknown height model {spec.height!r}")
    return dsm


def _elevation(cfg: SceneConfig, cmap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(lidar_bands, H, W) float32: DSM in metres (and LiDAR intensity where asked)."""
    dsm = _heights(cfg, cmap, _terrain(cfg, rng), rng)
    dsm = dsm + cfg.elevation_noise * rng.standard_normal(dsm.shape)
    bands = [dsm]
    if cfg.lidar_bands == 2:  # intensity at 1064 nm ~ NIR reflectance of the material
        nir = {m: float(_eval_terms(MATERIALS[m], np.array([1000.0]))[0]) for m in {c.material for c in cfg.classes}}
        refl = np.array([0.0] + [nir[c.material] for c in cfg.classes])[cmap]
        bands.append(255.0 * refl * (1.0 + 0.1 * _field(rng, cmap.shape, 2.0)) + 2.0 * rng.standard_normal(cmap.shape))
    elif cfg.lidar_bands != 1:
        raise InputError(f"preset {cfg.name!r}: lidar_bands must be 1 or 2, got {cfg.lidar_bands}")
    if cfg.elevation_error > 0:  # drawn last, so presets without it keep their draws
        bands[0] = bands[0] + elevation_error_std(cfg) * _field(rng, cmap.shape, cfg.elevation_error_scale)
    return np.stack(bands).astype(np.float32)


def elevation_error_std(cfg: SceneConfig) -> np.ndarray:
    """(H, W) std in metres of the preset's spatially correlated LiDAR height error: 0 left of
    column ``elevation_error_from · W``, rising linearly to ``elevation_error`` at the right edge."""
    start = cfg.elevation_error_from
    if not 0.0 <= start < 1.0:
        raise InputError(f"preset {cfg.name!r}: elevation_error_from must be in [0, 1), got {start}")
    x = (np.arange(cfg.width) + 0.5) / cfg.width
    ramp = np.clip((x - start) / (1.0 - start), 0.0, 1.0)
    return np.broadcast_to(cfg.elevation_error * ramp, (cfg.height, cfg.width)).copy()


# ----------------------------------------------------------------------------------------
# 4. SAR
# ----------------------------------------------------------------------------------------


def sar_means(cfg: SceneConfig) -> np.ndarray:
    """(K + 1, 4) mean linear backscatter per class (row 0 unused) and polarisation."""
    return np.array([[0.0] * 4] + [SAR_SIGNATURES[c.scattering] for c in cfg.classes])


def _sar(cfg: SceneConfig, cmap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(4, H, W) float32 dB: class mean σ0 × gamma speckle (mean 1, std 1/sqrt(looks))."""
    mean = sar_means(cfg)[cmap].transpose(2, 0, 1)  # (4, H, W)
    speckle = rng.gamma(cfg.sar_looks, 1.0 / cfg.sar_looks, size=mean.shape)
    return (10.0 * np.log10(np.maximum(mean * speckle, 1e-10))).astype(np.float32)


# ----------------------------------------------------------------------------------------
# 5. Labels
# ----------------------------------------------------------------------------------------


def _labelled(cfg: SceneConfig, cmap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: interior pixels inside surveyed blobs; a class short of pixels gets all its interior."""
    inner = interior(cmap)
    blobs = _field(rng, cmap.shape, max(cmap.shape) / 10)
    survey = blobs <= np.quantile(blobs, cfg.label_fraction)
    lab = inner & survey
    for k in range(1, len(cfg.classes) + 1):
        if np.count_nonzero(lab & (cmap == k)) < _needed(cfg):
            lab |= inner & (cmap == k)
    return lab


def _draw_clusters(rng: np.random.Generator, coords: np.ndarray, n: int, cluster: int) -> np.ndarray:
    """Indices (n,) into ``coords`` (N, 2): clusters of up to ``cluster`` nearest pixels each."""
    free = np.ones(len(coords), bool)
    picked: list[int] = []
    while len(picked) < n:
        seed_px = rng.choice(np.flatnonzero(free))
        d = np.abs(coords - coords[seed_px]).sum(axis=1).astype(np.float64)
        d[~free] = np.inf
        take = np.argsort(d, kind="stable")[: min(cluster, n - len(picked))]
        picked.extend(take.tolist())
        free[take] = False
    return np.asarray(picked)


def _splits(cfg: SceneConfig, cmap: np.ndarray, rng: np.random.Generator, val_split: str = "regions"
            ) -> tuple[dict[str, np.ndarray], dict]:
    """({"train", "val", "test"}: (H, W) uint16 label rasters, disjoint; val info for the metadata).

    ``random``: train + val drawn together, val carved at random (val next to train). ``regions``
    / ``blocks``: train drawn first; val drawn only from labelled pixels farther than
    ``DEFAULT_BUFFER`` (Chebyshev) from every train pixel (the farthest ones where too few are),
    in clusters like train's (``regions``) or as one compact block per class (``blocks``)."""
    if val_split not in VAL_METHODS:
        raise InputError(f"val split method must be one of {', '.join(VAL_METHODS)}, got {val_split!r}")
    lab = _labelled(cfg, cmap, rng)
    k_all = range(1, len(cfg.classes) + 1)
    if val_split == "random":
        n_tv = cfg.train_per_class + cfg.val_per_class
        trainval = np.zeros(cmap.shape, np.uint16)
        for k in k_all:
            coords = np.argwhere(lab & (cmap == k))
            idx = _draw_clusters(rng, coords, n_tv, cfg.train_cluster)
            trainval[coords[idx, 0], coords[idx, 1]] = k
        train, val, info = carve_val(trainval, fraction=cfg.val_per_class / n_tv, seed=int(rng.integers(2**31)),
                                     method="random", return_info=True)
    else:
        train = np.zeros(cmap.shape, np.uint16)
        for k in k_all:
            coords = np.argwhere(lab & (cmap == k))
            idx = _draw_clusters(rng, coords, cfg.train_per_class, cfg.train_cluster)
            train[coords[idx, 0], coords[idx, 1]] = k
        dist = ndimage.distance_transform_cdt(train == 0, metric="chessboard")
        val = np.zeros(cmap.shape, np.uint16)
        cluster = cfg.train_cluster if val_split == "regions" else cfg.val_per_class
        for k in k_all:
            free = lab & (cmap == k) & (train == 0)
            d = dist[free]
            # the farthest threshold that still leaves val_per_class pixels (> DEFAULT_BUFFER where it can)
            need = np.sort(d)[::-1][min(cfg.val_per_class, d.size) - 1]
            coords = np.argwhere(free & (dist >= min(DEFAULT_BUFFER + 1, need)))
            idx = _draw_clusters(rng, coords, cfg.val_per_class, cluster)
            val[coords[idx, 0], coords[idx, 1]] = k
        info = {"method": val_split, "metric": DISTANCE_METRIC, "buffer": DEFAULT_BUFFER,
                "min_distance": min_distance(val, train), "regions": int(regions(train)[1]), "dropped_train": 0}
    trainval = (train + val).astype(np.uint16)
    test = np.where(lab & (trainval == 0), cmap, 0).astype(np.uint16)
    return {"train": train, "val": val, "test": test}, info


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------


def make_scene(preset: Union[str, SceneConfig], seed: int = 0, val_split: str = "regions") -> SceneData:
    """A deterministic synthetic SceneData: modalities ``hsi`` (B, H, W) reflectance,
    ``lidar``/``dsm`` (1–2, H, W) metres, optionally ``sar`` (4, H, W) dB; labels train/val/test
    (H, W) uint16. Same (preset, seed, val_split) → bit-identical arrays. ``val_split``: how val
    is placed (regions, blocks: farther than the patch radius from train; random: next to it)."""
    cfg = get_config(preset)
    cmap = _layout(cfg, _rng(seed, _LAYOUT))
    hsi, centres = _hsi(cfg, cmap, _rng(seed, _HSI))
    mods = {
        "hsi": ModalityData(
            hsi, kind="hsi", wavelengths_nm=[float(c) for c in centres],
            band_names=[f"{c:.1f}nm" for c in centres], units="reflectance", source=f"synthetic:{cfg.name}",
        ),
        cfg.elevation_name: ModalityData(
            _elevation(cfg, cmap, _rng(seed, _ELEVATION)), kind=cfg.elevation_kind,
            band_names=["dsm", "intensity"][: cfg.lidar_bands], units="m", source=f"synthetic:{cfg.name}",
        ),
    }
    labels, val_info = _splits(cfg, cmap, _rng(seed, _LABELS), val_split)
    if cfg.sar:
        mods["sar"] = ModalityData(
            _sar(cfg, cmap, _rng(seed, _SAR)), kind="sar", band_names=[f"{b}_dB" for b in SAR_BANDS],
            units="dB", source=f"synthetic:{cfg.name}",
        )
    return SceneData(
        name=f"synthetic-{cfg.name}-s{seed}",
        modalities=mods,
        labels=labels,
        class_names=cfg.class_names,
        val_split=val_info,
        source={"synthetic": cfg.name, "seed": int(seed), "config": asdict(cfg)},
    )


__all__ = [
    "ClassSpec", "SceneConfig", "PRESETS", "IMBALANCE_HSI_CONFUSABLE", "IMBALANCE_ELEVATION_CONFUSABLE",
    "HARD_HSI_CONFUSABLE", "HARD_ELEVATION_CONFUSABLE", "MATERIALS", "SAR_SIGNATURES", "SAR_BANDS",
    "make_scene", "make_class_map", "get_config", "material_spectra", "sar_means", "interior", "elevation_error_std",
]
