"""The Ray Serve application over a model package: FastAPI routes wired to :mod:`bdgf.serve_api`
(all parsing, checking and formatting lives there) and a back end from
:func:`bdgf.backends.open_backend`.

    from serving.app import build
    serve.run(build("pkg", "infra/serve.yaml"), route_prefix="/")
"""

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from bdgf import serve_api
from bdgf.backends import open_backend

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "serve.yaml"

api = FastAPI(title="bdgf")


@serve.deployment
@serve.ingress(api)
class Classifier:
    def __init__(self, package: str, config: dict):
        self.backend = open_backend(package)
        self.max_bytes = int(config["max_body_bytes"])

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            serve_api.check_content(headers.get("content-type"), headers.get("content-length"), self.max_bytes)
        except serve_api.RequestError as exc:  # refuse before reading the body
            reply = serve_api.error_reply(exc)
            return Response(reply.body, status_code=reply.status, media_type=reply.media_type)
        body = await request.body()
        reply = await asyncio.to_thread(serve_api.classify, self.backend, body, dict(request.query_params),
                                        headers, self.max_bytes)
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type)

    @api.get("/v1/model")
    async def model(self) -> JSONResponse:
        return JSONResponse(serve_api.model(self.backend))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse(serve_api.health(self.backend))


def build(package: str | Path, config: str | Path | None = DEFAULT_CONFIG):
    """The application for ``package`` with the settings of ``config`` (None: the defaults)."""
    if config is not None and Path(config) == DEFAULT_CONFIG and not DEFAULT_CONFIG.exists():
        config = None  # an installed copy without infra/: the defaults
    cfg = serve_api.load_config(config)
    return Classifier.options(max_ongoing_requests=cfg["max_ongoing_requests"],
                              max_queued_requests=cfg["max_queued_requests"]).bind(str(Path(package).resolve()), cfg)
