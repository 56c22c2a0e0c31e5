"""The Ray Serve application over a model package: two deployments (the only module that imports
ray.serve and fastapi; the request logic is :mod:`bdgf.serve_api`, the tiling :mod:`bdgf.regions`).

    HTTP -> Ingress (FastAPI: parse + check, format; /healthz, /v1/model answered here)
              -> DeploymentHandle -> Model (back end; max_ongoing_requests, max_queued_requests)
                   plan_region -> windows -> run_tiles (@serve.batch across requests) -> place

The ingress has a generous ``ingress_max_ongoing_requests``, so /healthz and /v1/model never wait
behind model work; when the model's queue is full the handle raises BackPressureError and the
ingress answers a quick 503 JSON error. ``Model.check_health`` runs one window through the back
end. Settings: :mod:`bdgf.serve_config`.

    app = build_app("pkg", "infra/serve.yaml"); serve.run(app, route_prefix="/")
    url = start("pkg", "infra/serve.yaml", host="127.0.0.1", port=8000)   # a local Ray, or address=
"""

# (no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime)
import asyncio
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from bdgf import serve_api
from bdgf.backends import Classified, ModelPackage, open_backend
from bdgf.errors import BDGFError
from bdgf.regions import TileJob, classify_jobs, plan_region
from bdgf.serve_config import load_config
from bdgf.serve_formats import JSON

APP_NAME = "bdgf"
ROUTES = "POST /v1/classify, GET /v1/model, GET /healthz"
api = FastAPI(title="bdgf")


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer JSON errors too (FastAPI's own are {"detail": ...})."""
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}; the routes are {ROUTES}"},
                        status_code=exc.status_code)


def tiles_in(jobs: list[TileJob]) -> int:
    """The size of a batch of jobs, in tiles (what max_batch_tiles bounds)."""
    return sum(len(j) for j in jobs)


@serve.deployment
class Model:
    """One replica of the back end: a request's region is planned here and its windows go through
    :meth:`run_tiles`, which batches tiles of concurrent requests into shared back-end calls."""

    def __init__(self, package: str, config: Mapping[str, Any]):
        os.environ.setdefault("BDGF_ORT_THREADS", str(max(1, int(config["num_cpus"]))))
        self.backend = open_backend(package)
        pkg = self.backend.package
        self.max_batch = int(config["max_batch_tiles"]) or int(pkg.manifest["export"]["max_batch"])
        self.run_tiles.set_max_batch_size(self.max_batch)
        self.run_tiles.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))
        S = pkg.window_size
        self.probe = np.ascontiguousarray(np.broadcast_to(pkg.mean[:, None, None], (1, pkg.channels, S, S)))

    def info(self) -> dict:
        pkg = self.backend.package
        return {"backend": self.backend.name, "reason": self.backend.reason, "path": str(pkg.path),
                "manifest": pkg.manifest, "max_batch_tiles": self.max_batch}

    async def classify(self, image: np.ndarray, origin, region, absent, probabilities: bool):
        """(out, timing): classes (h, w), confidence (h, w) [, probabilities (K, h, w)] of ``region``
        of ``image`` (C, H, W), exactly as :func:`bdgf.regions.classify_region` gives them; timing
        {"model": seconds in this method, "backend": seconds of the back-end calls it waited on}."""
        t0 = time.perf_counter()
        plan = plan_region(self.backend.package, image, origin=origin, region=region, absent=absent)
        out = plan.empty(probabilities)
        backend_s = 0.0
        for part, windows, origins in plan.batches(self.max_batch):
            tiles, seconds = await self.run_tiles(TileJob(windows, origins, tuple(absent), probabilities))
            plan.place(out, part, tiles)
            backend_s += seconds
        return out, {"model": time.perf_counter() - t0, "backend": backend_s}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=tiles_in)
    async def run_tiles(self, jobs: list[TileJob]) -> list[tuple[Classified, float]]:
        """Each job's (per-tile results, seconds of the shared back-end calls)."""
        t0 = time.perf_counter()
        results = await asyncio.to_thread(classify_jobs, self.backend, jobs)
        seconds = time.perf_counter() - t0
        return [(r, seconds) for r in results]

    async def check_health(self) -> None:
        """One window through the back end; raises when it fails or classifies nothing."""
        out = await asyncio.to_thread(self.backend.classify, self.probe, [(0, 0)])
        T = self.backend.package.tile_size
        if out.classes.shape != (1, T, T) or not (out.classes > 0).all():
            raise BDGFError(f"health check: the back end gave classes {out.classes.shape} with "
                            f"{int((out.classes == 0).sum())} nodata pixels for a window of band means")


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError


def _response(reply: serve_api.Reply) -> Response:
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)


INLINE_BYTES = 1 << 18  # parse / format smaller payloads on the event loop (a thread hop costs more)


async def off_loop(nbytes: int, fn, *args):
    """``fn(*args)`` in a worker thread when it handles ``nbytes`` >= INLINE_BYTES, else inline."""
    return fn(*args) if nbytes < INLINE_BYTES else await asyncio.to_thread(fn, *args)


async def read_limited(request: Request, max_bytes: int) -> bytes:
    """The body, refused (413) as soon as it passes ``max_bytes`` (also without Content-Length)."""
    parts, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            raise serve_api.RequestError(413, f"body of more than {max_bytes} bytes is over the limit of "
                                              f"{max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP in and out; the model work goes to the :class:`Model` deployment through a handle."""

    async def __init__(self, model: DeploymentHandle, config: Mapping[str, Any]):
        self.model, self.config = model, dict(config)
        info = await model.info.remote()
        self.package = ModelPackage(Path(info["path"]), info["manifest"])
        self.backend_name = info["backend"]

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> Response:
        t0 = time.perf_counter()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            serve_api.check_content(headers.get("content-type"), headers.get("content-length"),
                                    int(self.config["max_body_bytes"]))
            body = await read_limited(request, int(self.config["max_body_bytes"]))
            req = await off_loop(len(body), serve_api.parse_request, body, dict(request.query_params), headers,
                                 self.package, self.config)
            del body
            out, timing = await self.model.classify.remote(req.raster.data, req.origin, req.region, req.absent,
                                                           req.probabilities)
            answer_bytes = out.classes.size * (2 if out.probabilities is None else 2 + 4 * len(out.probabilities))
            reply = await off_loop(answer_bytes, serve_api.make_reply, req, out, self.package)
            timing["ingress"] = time.perf_counter() - t0
            reply.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.2f}" for k, v in timing.items())
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON error reply
            reply = self._failure(exc)
        return _response(reply)

    def _failure(self, exc: Exception) -> serve_api.Reply:
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, BackPressureError):
            return serve_api.Reply(503, JSON, serve_api.error_json(
                f"overloaded: the model's queue is full ({self.config['max_queued_requests']} waiting requests); "
                "retry later"), {"Retry-After": "1"})
        if isinstance(exc, _unavailable_errors()):
            return serve_api.Reply(503, JSON, serve_api.error_json(
                f"the model replica is unavailable ({type(exc).__name__}); it is being replaced, retry later"),
                {"Retry-After": "1"})
        return serve_api.error_reply(exc)

    @api.get("/v1/model")
    async def manifest(self) -> JSONResponse:
        return JSONResponse(self.package.manifest)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "backend": self.backend_name})


def build_app(package: str | Path, config: str | Path | Mapping[str, Any] | None = None):
    """The application for ``package`` (checked here, opened by the model replicas) with the
    settings of ``config`` (a YAML path, a settings mapping from :func:`load_config`, or None: the defaults)."""
    cfg = dict(config) if isinstance(config, Mapping) else load_config(config)
    path = str(ModelPackage.open(package).path.resolve())
    opts: dict[str, Any] = {
        "max_ongoing_requests": cfg["max_ongoing_requests"], "max_queued_requests": cfg["max_queued_requests"],
        "ray_actor_options": {"num_cpus": cfg["num_cpus"], "num_gpus": cfg["num_gpus"]},
        "health_check_period_s": cfg["health_check_period_s"], "health_check_timeout_s": cfg["health_check_timeout_s"],
    }
    if cfg["autoscaling"]:
        opts["autoscaling_config"] = cfg["autoscaling"]
    else:
        opts["num_replicas"] = cfg["num_replicas"]
    model = Model.options(**opts).bind(path, cfg)
    return Ingress.options(max_ongoing_requests=cfg["ingress_max_ongoing_requests"],
                           ray_actor_options={"num_cpus": cfg["ingress_num_cpus"]}).bind(model, cfg)


def app_builder(args: dict[str, str]):
    """``serve run serving.app:app_builder package=PKG [config=infra/serve.yaml]`` (or a Serve
    config file's ``import_path`` with ``args``)."""
    unknown = sorted(set(args) - {"package", "config"})
    if "package" not in args or unknown:
        raise BDGFError(f"application arguments are package=PKG [config=YAML], got {sorted(args)}")
    return build_app(args["package"], args.get("config"))


def start(package: str | Path, config: str | Path | Mapping[str, Any] | None = None, host: str = "127.0.0.1",
          port: int = 8000, address: str | None = None) -> str:
    """Deploy the application on Ray (the one this process is connected to; else ``address``, else a
    new local Ray) with Serve's HTTP proxy on host:port, and return its URL once it answers."""
    import ray

    app = build_app(package, config)  # bad package or settings: an error before Ray starts
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop(shutdown_ray: bool) -> None:
    """Remove the application (and Serve and Ray too when this process started them)."""
    import ray

    if shutdown_ray:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP_NAME)
