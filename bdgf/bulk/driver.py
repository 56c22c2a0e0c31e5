"""The Dask driver of bulk classification: plan the chunks, prepare or resume the output, run one
task per chunk not yet done, show progress, write the COG.

    result = classify_mosaic("map.zarr", package="pkg", scene="mosaic.zarr", chunk=2048, workers=2, cog="map.tif")
    result.line()   # "classified 12 chunks (3 skipped, done before) of 150x130 px in 4.1s, ... px/s"

Every chunk is classified with :func:`bdgf.regions.classify_region` on its window with the
model's halo of real context (clipped at the mosaic's border), so the map equals classifying the
whole mosaic in one piece. See docs/bulk.md for the layout, the resume rules and the figures.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from bdgf.bulk.inputs import open_mosaic
from bdgf.bulk.outputs import create_map, finish_map
from bdgf.bulk.plan import ChunkPlan, check_chunk_size
from bdgf.bulk.resume import (MANIFEST, check_parameters, done_keys, model_checksum, new_manifest, read_manifest,
                              write_json)
from bdgf.errors import BDGFError


@dataclass
class BulkResult:
    out: Path
    shape: tuple[int, int]
    chunks: int  # in the plan
    computed: int  # by this call
    skipped: int  # done before this call
    pixels: int  # classified by this call
    seconds: float  # of the Dask part of this call
    backends: list[str] = field(default_factory=list)
    dashboard: str | None = None
    cog: Path | None = None
    package: Path | None = None

    def line(self) -> str:
        rate = self.pixels / self.seconds if self.seconds > 0 else 0.0
        text = (f"classified {self.computed} chunks ({self.skipped} skipped, done before) of the "
                f"{self.shape[0]}x{self.shape[1]} px mosaic into {self.out} in {self.seconds:.1f}s, "
                f"{rate:,.0f} px/s")
        if self.backends:
            text += f"; back end {', '.join(self.backends)}"
        if self.cog:
            text += f"; COG {self.cog}"
        return text


def _resuming(out: Path, parameters: dict, overwrite: bool) -> bool:
    """True when ``out`` is an output of the same ``parameters`` to resume; False when it is to be
    created (or replaced: ``overwrite``); a BDGFError when it belongs to another run."""
    if not out.exists() or overwrite:
        return False
    if not out.is_dir():
        raise BDGFError(f"{out}: exists and is not a bulk classification output; pass --overwrite to replace it")
    check_parameters(out, parameters)
    return True


def _create_output(out: Path, parameters: dict, *, shape, chunk, package, mosaic, probabilities) -> None:
    """Create ``out`` (atomically: a temporary directory renamed), replacing one that exists."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        create_map(tmp, height=shape[0], width=shape[1], chunk=chunk, class_names=package.class_names,
                   colours=package.manifest["classes"].get("colours", []), crs_wkt=mosaic.crs_wkt,
                   transform=mosaic.transform, probabilities=probabilities)
        write_json(tmp / MANIFEST, new_manifest(parameters))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def classify_mosaic(out: str | Path, *, package: str | Path | None = None, run: str | Path | None = None,
                    scene: str | Path | None = None, rasters: Mapping[str, str | Path] | None = None,
                    chunk: int = 2048, scheduler: str | None = None, workers: int | None = None, threads: int = 1,
                    gpu: bool = False, backend: str | None = None, probabilities: bool = False, batch: int = 16,
                    cog: str | Path | None = None, cog_blocksize: int = 512, overwrite: bool = False,
                    progress: bool = True, echo: Callable[[str], None] = print) -> BulkResult:
    """Classify a mosaic (a scene store ``scene`` or per-modality ``rasters``) with a model
    ``package`` (or a ``run``, exported once) into the Zarr ``out`` (and the COG ``cog``), with
    Dask: ``scheduler`` (an address) or a local cluster of ``workers`` × ``threads``. Resumes a
    killed run made with the same parameters; refuses another run's output unless ``overwrite``."""
    from bdgf.backends import ModelPackage
    from bdgf.bulk.cluster import dask_client
    from bdgf.bulk.cog import write_cog
    from bdgf.bulk.package import package_for_run
    from bdgf.bulk.worker import ChunkTask, classify_chunk
    from bdgf.progress import Progress

    out = Path(out).absolute()
    if (package is None) == (run is None):
        raise BDGFError("give either a model package (--model) or a run directory (--run), not both")
    if batch < 1:
        raise BDGFError(f"batch must be >= 1 tile, got {batch}")
    if run is not None:
        package, exported = package_for_run(run, out)
        echo(f"{'exported' if exported else 'reusing'} the model package {package} of run {run}")
    pkg = ModelPackage.open(package)
    mosaic = open_mosaic(scene, rasters)
    mosaic.check_package(pkg)
    check_chunk_size(chunk, pkg)
    plan = ChunkPlan(mosaic.height, mosaic.width, chunk, pkg.halo)
    parameters = {"model_sha256": model_checksum(pkg), "backend": (backend or "auto").lower(), "chunk": int(chunk),
                  "halo": pkg.halo, "inputs": mosaic.describe(), "probabilities": bool(probabilities),
                  "batch": int(batch)}
    resuming = _resuming(out, parameters, overwrite)  # another run's output is refused before any work
    chunks = plan.chunks()
    done = done_keys(out) if resuming else set()
    todo = [c for c in chunks if c.key not in done]
    attempt = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    result = BulkResult(out, (mosaic.height, mosaic.width), len(chunks), 0, len(chunks) - len(todo), 0, 0.0,
                        package=Path(package))
    if todo:
        pkg_path = str(Path(package).absolute())
        with dask_client(scheduler, workers, threads, gpu) as client:  # an unreachable scheduler: nothing written
            if not resuming:
                _create_output(out, parameters, shape=(mosaic.height, mosaic.width), chunk=chunk, package=pkg,
                               mosaic=mosaic, probabilities=probabilities)
            result.dashboard = client.dashboard_link
            echo(f"dask: {len(todo)} chunks of {chunk} px to classify ({result.skipped} done before); "
                 f"dashboard {result.dashboard}")
            tasks = {}
            for i, c in enumerate(todo):
                task = ChunkTask(mosaic, plan, c, pkg_path, backend, str(out), probabilities, batch, threads, attempt)
                fut = client.submit(classify_chunk, task, key=f"bdgf-chunk-{c.key}-{attempt}", pure=False,
                                    priority=-i)
                tasks[fut] = c
            _collect(client, tasks, result, Progress(len(chunks), "classify", "chunk", initial=result.skipped,
                                                     enabled=progress))
    finish_map(out)
    manifest = read_manifest(out) or new_manifest(parameters)
    manifest["status"] = "complete"
    manifest["backends_used"] = sorted(set(manifest.get("backends_used", [])) | set(result.backends))
    write_json(out / MANIFEST, manifest)
    if cog is not None:
        result.cog = write_cog(out, cog, blocksize=cog_blocksize)
    return result


def _collect(client, tasks: dict, result: BulkResult, bar) -> None:
    """Wait for the chunk futures, updating ``bar`` (chunks, px/s, ETA) and ``result``; the first
    failure cancels the rest and is a BDGFError naming the chunk (its marker is not written)."""
    from distributed import as_completed

    start = time.perf_counter()
    backends = set()
    left_px = sum(c.pixels for c in tasks.values())
    with bar:
        for fut in as_completed(list(tasks)):
            c = tasks[fut]
            try:
                info = fut.result()
            except Exception as exc:  # noqa: BLE001 - any task failure (Ctrl-C is not one: it propagates)
                client.cancel(list(tasks))
                raise BDGFError(f"{c} failed, the run stops (its marker is not written; rerun the same command "
                                f"to resume): {type(exc).__name__}: {exc}") from exc
            result.computed += 1
            result.pixels += c.pixels
            left_px -= c.pixels
            backends.add(info["backend"])
            elapsed = time.perf_counter() - start
            rate = result.pixels / elapsed if elapsed > 0 else 0.0
            bar.update(1, px_s=rate, eta=f"{left_px / rate:.0f}s" if rate > 0 else "?")
    result.seconds = time.perf_counter() - start
    result.backends = sorted(backends)
