#!/usr/bin/env bash
# A two-node Ray cluster on this one machine, as the proof that BDGF runs on an existing cluster:
#   1. `ray start --head` and a second `ray start --address …` node (each its own temp dir and
#      ports, on 127.0.0.1, one CPU each so Ray Train puts one worker on each node);
#   2. `ray job submit` of pretraining with 2 workers (one per node), then features and
#      classifier training the same way, on a tiny synthetic scene;
#   3. `bdgf export` (ONNX) and the Serve application deployed to that cluster (`bdgf serve
#      --address`), queried over HTTP with a GeoTIFF tile (`bdgf client classify`);
#   4. teardown: both nodes stopped, and a check that no Ray process of this cluster is left.
#
#   infra/two_node_local.sh [WORKDIR]        (default: a new folder under /tmp; kept afterwards)
#
# Needs the project installed (`make install`; BIN=.venv/bin by default). Takes a few minutes on
# 2 cores. Exit status 0 only when every step worked and nothing was left running.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$REPO/.venv/bin}"
if [ -n "${1:-}" ]; then mkdir -p "$1"; WORK="$(cd "$1" && pwd)"; else WORK="$(mktemp -d /tmp/bdgf-2node.XXXXXX)"; fi
export PATH="$BIN:$PATH" OMP_NUM_THREADS=1 BDGF_ORT_THREADS=1 RAY_USAGE_STATS_ENABLED=0
# Ray's token authentication with a token of this cluster's own (every process below inherits it),
# so neither a ~/.ray/auth_token from another cluster nor its absence gets in the way.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$("$BIN/python" -c 'import secrets; print(secrets.token_hex(32))')"
cd "$REPO"

free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GCS=$(free_port); DASH=$(free_port); CLIENT=$(free_port); HTTP=$(free_port)
AGENT_HEAD=$(free_port); AGENT_WORKER=$(free_port)
PIDS=()

say() { printf '\n== %s\n' "$*"; }

teardown() {
    local status=$?
    say "teardown"
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 1 60); do
        pgrep -f "$WORK/ray-" >/dev/null || break
        sleep 1
    done
    if pgrep -af "$WORK/ray-"; then
        echo "Ray processes of this cluster are still running (listed above); killing them" >&2
        pkill -KILL -f "$WORK/ray-" || true
        status=1
    else
        echo "no Ray process of this cluster is left"
    fi
    [ $status -eq 0 ] || tail -n 20 "$WORK"/serve.log 2>/dev/null || true
    [ $status -eq 0 ] && echo "two-node run: OK ($WORK)" || echo "two-node run: FAILED (status $status; logs in $WORK)" >&2
    exit $status
}
trap teardown EXIT

say "1/4 two Ray nodes on 127.0.0.1 (head: GCS $GCS, dashboard $DASH; temp dirs under $WORK)"
# --block keeps each node's processes in one process group that teardown stops with one signal.
setsid ray start --head --node-ip-address 127.0.0.1 --port "$GCS" --num-cpus 1 \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
    --ray-client-server-port "$CLIENT" --dashboard-agent-listen-port "$AGENT_HEAD" \
    --temp-dir "$WORK/ray-head" --disable-usage-stats --block >"$WORK/head.log" 2>&1 &
PIDS+=($!)
"$BIN/python" - "$GCS" <<'EOF'
import socket, sys, time
end = time.time() + 120
while socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))) and time.time() < end:
    time.sleep(0.5)
EOF
setsid ray start --address "127.0.0.1:$GCS" --node-ip-address 127.0.0.1 --num-cpus 1 \
    --dashboard-agent-listen-port "$AGENT_WORKER" --temp-dir "$WORK/ray-worker" \
    --disable-usage-stats --block >"$WORK/worker.log" 2>&1 &
PIDS+=($!)
"$BIN/python" - "127.0.0.1:$GCS" <<'EOF'
import sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
end = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    if time.time() > end:
        sys.exit("the second node did not join within 120 s")
    time.sleep(1)
print("nodes:", [(n["NodeManagerAddress"], n["NodeManagerPort"], n["Resources"].get("CPU")) for n in ray.nodes() if n["Alive"]])
EOF

say "2/4 ray job submit: pretraining, features, training with 2 workers (one per node)"
bdgf synth "$WORK/scene.zarr" --preset tiny --seed 0 --overwrite
cat >"$WORK/run.yaml" <<'EOF'
pretrain: {steps: 12, batch_size: 4, tile_size: 16, checkpoint_every: 6, log_every: 3,
           unet: {base_channels: 8, channel_mults: [1, 2], feature_levels: [0, 1, 1]}}
features: {tile_size: 16, timesteps: [5, 50], batch_size: 8}
train: {patch_size: 7, batch_size: 16, epochs: 3, branches: [cnn]}
EOF
export RAY_ADDRESS="http://127.0.0.1:$DASH"
ray job submit --entrypoint-num-cpus 0 -- python "$REPO/training/pretrain.py" "$WORK/scene.zarr" \
    --out "$WORK/run" --config "$WORK/run.yaml" --workers 2
"$BIN/python" - "$DASH" <<'EOF'
import sys
from ray.util.state import list_actors
workers = list_actors(address=f"http://127.0.0.1:{sys.argv[1]}", filters=[("class_name", "=", "RayTrainWorker")],
                      detail=True, limit=100)
nodes = sorted({a.node_id for a in workers})
print(f"pretraining ran {len(workers)} Ray Train workers on {len(nodes)} nodes: {[n[:8] for n in nodes]}")
if len(nodes) != 2:
    sys.exit("expected the 2 workers on the 2 nodes")
EOF
ray job submit --entrypoint-num-cpus 0 -- python "$REPO/training/features.py" "$WORK/scene.zarr" \
    --run "$WORK/run" --workers 2
ray job submit --entrypoint-num-cpus 0 -- python "$REPO/training/train.py" "$WORK/scene.zarr" \
    --run "$WORK/run" --workers 2
unset RAY_ADDRESS

say "3/4 export, the Serve application on this cluster, a GeoTIFF tile over HTTP"
bdgf export "$WORK/run" --format onnx --out "$WORK/pkg" --overwrite
"$BIN/python" - "$WORK/scene.zarr" "$WORK/tile.tif" <<'EOF'
import sys
import numpy as np, rasterio
from rasterio.transform import from_origin
from bdgf.data.scene import Scene
scene = Scene.open(sys.argv[1])
raw = np.concatenate([np.asarray(scene.modality(m), np.float32) for m in scene.modality_names])[:, :32, :32]
with rasterio.open(sys.argv[2], "w", driver="GTiff", width=32, height=32, count=raw.shape[0], dtype="float32",
                   crs="EPSG:32632", transform=from_origin(600000, 5100000, 1, 1)) as dst:
    dst.write(raw)
print(f"tile {sys.argv[2]}: {raw.shape}")
EOF
setsid bdgf serve "$WORK/pkg" --address "127.0.0.1:$GCS" --host 127.0.0.1 --port "$HTTP" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
"$BIN/python" - "$HTTP" "$!" <<'EOF'
import os, sys, time, urllib.request
end = time.time() + 180
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=5) as r:
            print("healthz:", r.status, r.read().decode()); break
    except OSError:
        try:
            os.kill(int(sys.argv[2]), 0)
        except ProcessLookupError:
            sys.exit("`bdgf serve` exited before the application answered (see serve.log)")
        if time.time() > end:
            sys.exit("the Serve application did not answer /healthz within 180 s")
        time.sleep(1)
EOF
bdgf client classify --url "http://127.0.0.1:$HTTP" "$WORK/tile.tif" --out "$WORK/map.tif"
"$BIN/python" - "$WORK/map.tif" <<'EOF'
import sys
import numpy as np, rasterio
with rasterio.open(sys.argv[1]) as src:
    classes = src.read(1)
    print(f"map {sys.argv[1]}: {classes.shape}, classes {sorted(np.unique(classes).tolist())}, crs {src.crs}")
    assert classes.shape == (32, 32) and (classes > 0).all() and src.crs is not None
EOF

say "4/4 done; stopping the cluster"
