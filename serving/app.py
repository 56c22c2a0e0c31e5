"""The Ray Serve entry point over a model package; everything lives in :mod:`bdgf.serve_app`.

    serve run serving.app:app_builder package=PKG [config=infra/serve.yaml]
    # or a Serve config file: import_path: serving.app:app_builder, args: {package: PKG, config: ...}
    # or: bdgf serve PKG [--config infra/serve.yaml]
"""

from pathlib import Path

from bdgf.serve_app import app_builder, build_app

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "serve.yaml"


def build(package, config=DEFAULT_CONFIG):
    """The application for ``package`` with the settings of ``config`` (None: the defaults)."""
    return build_app(package, config if config is None or Path(config).exists() else None)


__all__ = ["app_builder", "build", "build_app"]
