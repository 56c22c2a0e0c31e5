"""``bdgf serve`` and ``bdgf client classify``: the HTTP endpoint's commands (registered on
:data:`bdgf.cli.app`; the work is in :mod:`bdgf.serve_app` and :mod:`bdgf.client`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bdgf.cli import _fail, app, command
from bdgf.errors import BDGFError

client_app = typer.Typer(help="Talk to a running `bdgf serve` endpoint.", no_args_is_help=True)
app.add_typer(client_app, name="client")


@command()
def serve(
    package: Path = typer.Argument(..., help="Model package written by `bdgf export`."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to deploy on (auto, ray://HOST:10001, "
                                                     "HOST:6379); default: start a local Ray."),
    host: str = typer.Option("127.0.0.1", help="Interface the HTTP proxy listens on (0.0.0.0: all)."),
    port: int = typer.Option(8000, help="HTTP port."),
    config: Optional[Path] = typer.Option(None, help="Serving settings (infra/serve.yaml); default: the built-in ones."),
) -> None:
    """Serve a model package over HTTP (Ray Serve) until Ctrl-C: POST /v1/classify, GET /v1/model, GET /healthz."""
    import time

    import ray

    from bdgf.serve_app import start, stop

    started_here = not ray.is_initialized() and address is None
    url = start(package, config, host=host, port=port, address=address)
    typer.echo(f"serving {package} at {url}  (POST {url}/v1/classify, GET {url}/v1/model, GET {url}/healthz); "
               "Ctrl-C stops it")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("stopping")
    finally:
        stop(shutdown_ray=started_here)


@client_app.command("classify")
def client_classify(
    tile: Path = typer.Argument(..., help="GeoTIFF raster: every modality's bands stacked in the model's order."),
    out: Path = typer.Option(..., "--out", help="Class map to write (GeoTIFF: band 1 classes, band 2 confidence)."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The endpoint's base URL."),
    row: int = typer.Option(0, help="Scene row of the raster's top-left pixel."),
    col: int = typer.Option(0, help="Scene column of the raster's top-left pixel."),
    region: Optional[str] = typer.Option(None, help="r0,c0,h,w: classify only this part (the rest is context)."),
    absent: Optional[list[str]] = typer.Option(None, help="A modality left out (repeatable)."),
    probabilities: bool = typer.Option(False, help="Add the class probabilities as bands 3.. (float32)."),
    timeout: float = typer.Option(300.0, help="Seconds to wait for the answer."),
) -> None:
    """Classify a GeoTIFF with a running endpoint and write the georeferenced class map."""
    from bdgf.client import classify_file

    try:
        box = None
        if region:
            try:
                box = [int(v) for v in region.split(",")]
            except ValueError:
                raise BDGFError(f"--region is r0,c0,h,w (four whole numbers), got {region!r}") from None
        parts = [a.strip() for item in absent or [] for a in item.split(",") if a.strip()]
        res = classify_file(url, tile, out, row=row, col=col, region=box, absent=parts, probabilities=probabilities,
                            timeout=timeout)
    except BDGFError as exc:
        _fail(exc)
    found = ", ".join(f"{name} {n}" for name, n in res.found().items()) or "none"
    h, w = res.classes.shape
    typer.echo(f"{out}: {h}x{w} px; classes found: {found}; nodata {res.nodata_pixels} px; {res.seconds:.2f} s")
