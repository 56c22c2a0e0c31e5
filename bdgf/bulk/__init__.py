"""Bulk classification of whole mosaics with Dask (``bdgf classify``; docs/bulk.md).

One concern a module:

- :mod:`bdgf.bulk.inputs`    the mosaic: a scene store or per-modality rasters, read in windows
- :mod:`bdgf.bulk.plan`      output chunks and their input windows with the model's halo
- :mod:`bdgf.bulk.resume`    the run's manifest and per-chunk done markers (resume, refuse)
- :mod:`bdgf.bulk.outputs`   the output Zarr (classes, confidence, probabilities, CRS)
- :mod:`bdgf.bulk.cog`       the class map as a validated Cloud-Optimised GeoTIFF
- :mod:`bdgf.bulk.package`   the model package, exported once from a run when asked
- :mod:`bdgf.bulk.cluster`   the Dask client: a named scheduler, a LocalCluster, a LocalCUDACluster
- :mod:`bdgf.bulk.worker`    inside a worker: one model per process, one chunk's task
- :mod:`bdgf.bulk.driver`    :func:`classify_mosaic`, which ties them together
- :mod:`bdgf.bulk.synthetic` a large synthetic mosaic written chunk by chunk (``bdgf synth --preset mosaic``)
"""

from bdgf.bulk.driver import BulkResult, classify_mosaic

__all__ = ["BulkResult", "classify_mosaic"]
