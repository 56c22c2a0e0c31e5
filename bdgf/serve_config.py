"""The serving settings (``infra/serve.yaml``): their defaults, their checks, and what each one sets.

The model deployment (the back end, batched across requests):
    max_ongoing_requests    requests one model replica works on at once
    max_queued_requests     requests waiting for a model replica; beyond it the ingress answers 503
    max_batch_tiles         tiles per back-end call, across requests (0: the package's max_batch)
    batch_wait_timeout_s    how long a batch waits for more tiles before it runs
    num_replicas            fixed replica count (ignored when ``autoscaling`` is set)
    autoscaling             Serve's autoscaling_config: min_replicas, max_replicas, initial_replicas,
                            target_ongoing_requests, upscale_delay_s, downscale_delay_s
    num_cpus, num_gpus      each model replica's ray_actor_options (ONNX Runtime gets num_cpus threads)
    health_check_period_s, health_check_timeout_s   the replica's check_health (one tiny inference)
The ingress (HTTP, parsing, formatting; answers /healthz even when the model's queue is full):
    ingress_max_ongoing_requests, ingress_num_cpus
Request limits (413 above them):
    max_body_bytes, max_pixels (H·W of one request's raster)
"""

from __future__ import annotations

from pathlib import Path

from bdgf.errors import BDGFError

DEFAULTS = {
    "max_ongoing_requests": 8,
    "max_queued_requests": 64,
    "max_body_bytes": 64 * 1024 * 1024,
    "max_pixels": 4096 * 4096,
    "max_batch_tiles": 0,
    "batch_wait_timeout_s": 0.005,
    "num_replicas": 1,
    "autoscaling": None,
    "num_cpus": 1.0,
    "num_gpus": 0.0,
    "health_check_period_s": 10.0,
    "health_check_timeout_s": 30.0,
    "ingress_max_ongoing_requests": 256,
    "ingress_num_cpus": 0.5,
}
# key -> (kind, lowest allowed value); kind "int" a whole number, "float" any number
LIMITS = {
    "max_ongoing_requests": ("int", 1), "max_queued_requests": ("int", 1), "max_body_bytes": ("int", 1),
    "max_pixels": ("int", 1), "max_batch_tiles": ("int", 0), "batch_wait_timeout_s": ("float", 0.0),
    "num_replicas": ("int", 1), "num_cpus": ("float", 0.0), "num_gpus": ("float", 0.0),
    "health_check_period_s": ("float", 0.1), "health_check_timeout_s": ("float", 0.1),
    "ingress_max_ongoing_requests": ("int", 1), "ingress_num_cpus": ("float", 0.0),
}
AUTOSCALING = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "target_ongoing_requests": 0.1,
               "upscale_delay_s": 0.0, "downscale_delay_s": 0.0}


def _check_number(where: str, key: str, value, kind: str, low: float):
    whole = kind == "int"
    ok = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool) and value >= low
    if not ok:
        raise BDGFError(f"{where}: {key} must be {'a whole number' if whole else 'a number'} >= {low}, "
                        f"got {value!r}")
    return value if whole else float(value)


def check_autoscaling(where: str, value) -> dict | None:
    """None, or a mapping of :data:`AUTOSCALING` keys with min_replicas <= max_replicas."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BDGFError(f"{where}: autoscaling must be a mapping of {sorted(AUTOSCALING)}, got {value!r}")
    unknown = sorted(set(value) - set(AUTOSCALING))
    if unknown:
        raise BDGFError(f"{where}: unknown autoscaling settings {unknown}; known: {sorted(AUTOSCALING)}")
    out = {k: _check_number(where, f"autoscaling.{k}", v, "float" if k.endswith(("_s", "requests")) else "int",
                            AUTOSCALING[k]) for k, v in value.items()}
    if out.get("min_replicas", 1) > out.get("max_replicas", max(1, out.get("min_replicas", 1))):
        raise BDGFError(f"{where}: autoscaling.min_replicas {out['min_replicas']} is above max_replicas "
                        f"{out['max_replicas']}")
    return out


def load_config(path: str | Path | None = None) -> dict:
    """Serving settings: DEFAULTS overridden by the ``serve:`` mapping (or top level) of a YAML
    file. Unknown keys and out-of-range values are errors naming the key."""
    cfg = dict(DEFAULTS)
    if path is None:
        return cfg
    import yaml

    path = Path(path)
    if not path.exists():
        raise BDGFError(f"{path}: no serving config there")
    data = yaml.safe_load(path.read_text()) or {}
    data = data.get("serve", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise BDGFError(f"{path}: the serving config must be a mapping of settings")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise BDGFError(f"{path}: unknown serving settings {unknown}; known: {sorted(DEFAULTS)}")
    for key, value in data.items():
        cfg[key] = check_autoscaling(str(path), value) if key == "autoscaling" else \
            _check_number(str(path), key, value, *LIMITS[key])
    return cfg
