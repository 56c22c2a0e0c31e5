"""``bdgf classify``: bulk classification of mosaics (registered on :data:`bdgf.cli.app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bdgf.cli import _parse_pairs, command


@command()
def classify(
    scene: Optional[Path] = typer.Argument(None, help="Scene store to classify (labels, if any, are ignored); "
                                           "or give --modality rasters instead."),
    out: Path = typer.Option(..., "--out", help="Output Zarr (classes, confidence, CRS); a killed run "
                             "restarted with the same command resumes it."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model package (bdgf export)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory instead of --model: exported to an "
                                       "ONNX package once, next to the output (OUT.model), reused while it matches."),
    modality: Optional[list[str]] = typer.Option(None, "--modality", help="NAME=PATH raster per modality "
                                                 "(GeoTIFF/COG or Zarr array), repeatable; grids must align."),
    chunk: int = typer.Option(2048, help="Output chunk side in px (a multiple of the model's tile size)."),
    workers: Optional[int] = typer.Option(None, help="Local Dask worker processes (default: CPUs / threads)."),
    threads: int = typer.Option(1, help="Threads per worker (ONNX Runtime threads follow)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler "
                                            "(tcp://host:8786) instead of a local cluster."),
    gpu: bool = typer.Option(False, "--gpu", help="A local dask-cuda LocalCUDACluster (one worker per GPU)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="tensorrt, onnx, aoti or torch (default: "
                                          "$BDGF_BACKEND, else the first that runs)."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also store class probabilities (uint8)."),
    batch: int = typer.Option(16, help="Tiles per call to the back end."),
    cog: Optional[Path] = typer.Option(None, "--cog", help="Also write the class map as a Cloud-Optimised GeoTIFF."),
    cog_blocksize: int = typer.Option(512, "--cog-blocksize", help="COG tile side in px."),
    overwrite: bool = typer.Option(False, help="Replace an output made by another run (other parameters)."),
) -> None:
    """Classify a whole mosaic chunk by chunk on a Dask cluster (seamless: equals one-piece classification)."""
    from bdgf.bulk.driver import classify_mosaic

    rasters = _parse_pairs(modality, "--modality") or None
    result = classify_mosaic(out, package=model, run=run, scene=scene, rasters=rasters, chunk=chunk,
                             scheduler=scheduler, workers=workers, threads=threads, gpu=gpu, backend=backend,
                             probabilities=probabilities, batch=batch, cog=cog, cog_blocksize=cog_blocksize,
                             overwrite=overwrite, echo=typer.echo)
    typer.echo(result.line())
