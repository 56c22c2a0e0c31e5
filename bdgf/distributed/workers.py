"""What runs inside each Ray Train worker: the stage body of :mod:`bdgf.engine` in a RayContext.

Every worker opens its own shard straight from the Zarr store(s) by path: nothing scene-sized goes
through the driver or the object store. The loops and bodies are the single-process ones; only
the context differs: rank and world size from Ray Train, the DeepSpeed (or DDP) stepper, masking
statistics gathered over ranks, and checkpoints reported to Ray Train.

A checkpoint directory (one per report, merged from all ranks by Ray Train) holds:
    meta.json       stage, step/epoch, the signature of model + data layout (checked on resume)
    denoiser.pt     (pretrain) exactly the single-process checkpoint
    classifier.pt   (train) the best-on-val classifier so far
    train_state.pt  (train) epochs done and the best so far
    engine/         DeepSpeed's own checkpoint (every rank's shard) or ddp.pt
    rng_rank<r>.pt  every rank's RNG streams (torch, numpy, python, CUDA, the loop's generators)
    log.jsonl       rank 0's log up to this checkpoint (so a restart drops the lost steps' lines)
The driver copies every file but ``meta.json``, ``rng_rank<r>.pt`` and ``engine/`` of the final one
into the run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bdgf.errors import BDGFError
from bdgf.run import CheckpointMismatch, JsonlLogger, check_signature, write_checkpoint

log = logging.getLogger("bdgf.distributed")


class SyncedMasking:
    """Adaptive modality masking whose statistics see every rank's batch.

    ``update`` all-gathers the paired log-ratios and which modality each pair masked (every
    rank's pairs), so each rank folds the same global set of pairs into its dependence estimate
    and every rank keeps the same masking probabilities. Everything else is the wrapped
    :class:`AdaptiveModalityMasking`.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, pair_log_ratio: torch.Tensor, pair_masked: torch.Tensor) -> None:
        """pair_log_ratio (N, M), pair_masked (N, M): this rank's pairs (see
        ``AdaptiveModalityMasking.update``); every rank has the same N."""
        import torch.distributed as dist

        world = dist.get_world_size()
        both = torch.cat([pair_log_ratio.detach().float(), pair_masked.detach().float().to(pair_log_ratio.device)], 1)
        parts = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(parts, both.contiguous())
        allb = torch.cat(parts, 0)
        m = pair_log_ratio.shape[1]
        self.inner.update(allb[:, :m], allb[:, m:])


class RayContext:
    """A stage body's context on a Ray Train worker (same interface as ``LocalContext``)."""

    def __init__(self, launch: dict):
        import ray.train

        c = ray.train.get_context()
        self.rank, self.world = c.get_world_rank(), c.get_world_size()
        self.engine = launch["engine"]
        self.ds_config = launch["ds_config"]
        self.run_dir = launch["run_dir"]
        self.stage_rel = launch["stage_rel"]  # e.g. "pretrain" or "train/seed0"
        self.where = f"worker rank {self.rank}"
        self.progress = False
        if launch.get("device", "cpu") == "gpu":  # chosen on the driver from the cluster's resources
            if not torch.cuda.is_available():
                raise BDGFError(f"{self.where}: the job asked for a GPU but torch sees no CUDA device on this node")
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")

    def make_stepper(self, model, optimizer, grad_clip):
        from bdgf.distributed.steppers import make_engine

        return make_engine(self.engine, model, optimizer, self.ds_config, self.device)

    def optimizer_state(self, stepper, model) -> dict | None:
        """Collective (every rank calls it): the whole optimiser state as a plain torch optimiser's
        ``{"optimizer": state_dict}`` over ``model.parameters()``, whatever the engine partitioned,
        so that ``denoiser.pt`` can be resumed by a single process too. For ZeRO stage 1/2 every
        parameter's fp32 moments are gathered from the ranks' partitions (DeepSpeed's
        ``safe_get_full_optimizer_state``); None where the engine keeps no such state."""
        plain = stepper.state_dict() if hasattr(stepper, "state_dict") else None
        if plain is not None or not hasattr(stepper, "engine"):
            return plain
        engine, optimizer = stepper.engine, stepper.optimizer
        if engine.zero_optimization_stage() == 0:  # the torch optimiser itself, the same on every rank
            return {"optimizer": optimizer.state_dict()}
        from deepspeed.utils import safe_get_full_optimizer_state

        base = getattr(engine.optimizer, "optimizer", optimizer)
        steps = [st["step"] for st in base.state.values() if "step" in st]
        params = list(model.parameters())
        state = {}
        for i, prm in enumerate(params):
            moments = {k: safe_get_full_optimizer_state(prm, k) for k in ("exp_avg", "exp_avg_sq")}
            if any(v is None for v in moments.values()) or not steps:
                return None
            step = steps[0].detach().clone().cpu() if torch.is_tensor(steps[0]) else torch.tensor(float(steps[0]))
            state[i] = {"step": step, **{k: v.detach().float().cpu().clone() for k, v in moments.items()}}
        hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        return {"optimizer": {"state": state, "param_groups": [{**hyper, "params": list(range(len(params)))}]}}

    def load_optimizer_state(self, stepper, model, plain: dict) -> bool:
        """Put a plain torch optimiser state (``{"optimizer": state_dict}`` over
        ``model.parameters()``, as :meth:`optimizer_state` or a single process writes it) into this
        rank's engine: whole for DDP or ZeRO stage 0, this rank's partition of every moment for
        ZeRO stage 1/2. False (nothing loaded) where it does not fit the model."""
        state = (plain or {}).get("optimizer") or {}
        params = list(model.parameters())
        moments = state.get("state") or {}
        if not moments or any(int(i) >= len(params) or moments[i]["exp_avg"].shape != params[int(i)].shape
                              for i in moments):
            return False
        if not hasattr(stepper, "engine"):  # DDP: the plain torch optimiser
            stepper.load_state_dict(plain)
            return True
        engine, optimizer = stepper.engine, stepper.optimizer
        if engine.zero_optimization_stage() == 0:
            optimizer.load_state_dict(state)
            return True
        from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

        zero = engine.optimizer
        base = zero.optimizer
        step = next(iter(moments.values()))["step"]
        for flat in zero.single_partition_of_fp32_groups:  # the state AdamW creates at its first step
            base.state[flat] = {"step": step.detach().clone().cpu() if torch.is_tensor(step) else torch.tensor(float(step)),
                                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(group, flat, base.state)
        zero._hp_optimizer_states_linked = True
        for i, prm in enumerate(params):
            if i in moments:
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(prm, moments[i][key].to(prm.device, torch.float32), key)
        return True

    def gather(self, obj) -> list:
        """Collective: every rank's ``obj``, in rank order."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def restore(self, signature: dict) -> tuple[Path | None, dict | None]:
        """(local copy of Ray Train's latest checkpoint, its meta), or (None, None)."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None, None
        local = Path(tempfile.mkdtemp(prefix="bdgf-restore-"))
        with ckpt.as_directory() as d:
            shutil.copytree(d, local, dirs_exist_ok=True)
        meta_path = local / "meta.json"
        if not meta_path.exists():
            raise CheckpointMismatch(f"{self.where}: checkpoint {ckpt.path} has no meta.json (not a BDGF checkpoint)")
        meta = json.loads(meta_path.read_text())
        check_signature(meta.get("signature", {}), signature, ckpt.path)
        return local, meta

    def logger(self, name: str, restored: str = "", append: bool = False) -> JsonlLogger:
        """Rank 0's live log: in the run dir when this node sees it, else a temporary folder;
        restarted from the checkpoint's lines (the steps after it were lost and run again)."""
        path = Path(self.run_dir) / self.stage_rel / name
        if not Path(self.run_dir).exists():
            path = Path(tempfile.mkdtemp(prefix="bdgf-log-")) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(restored)
        self._log_path = path
        return JsonlLogger(path, append=True)

    def checkpoint(self, tag: str, metrics: dict, files: dict, meta: dict, stepper=None,
                   rank_state: dict | None = None) -> None:
        """Write this rank's part (engine shard and ``rank_state``, its RNG streams, as
        ``rng_rank<r>.pt``; rank 0 also ``files``, meta and the log so far) and report it to Ray
        Train: a barrier across ranks."""
        import ray.train
        from ray.train import CheckpointConsistencyMode

        tmp = Path(tempfile.mkdtemp(prefix=f"bdgf-{tag}-r{self.rank}-"))
        try:
            if stepper is not None:
                stepper.save(tmp / "engine")
            if rank_state is not None:
                write_checkpoint(rank_state, tmp / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                for name, obj in files.items():
                    if obj is not None:
                        write_checkpoint(obj, tmp / name)
                (tmp / "meta.json").write_text(json.dumps(meta))
                if getattr(self, "_log_path", None) is not None:
                    shutil.copy(self._log_path, tmp / "log.jsonl")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=tag)
            # Wait until the controller has committed it: a worker killed right after a report must
            # still restart from this checkpoint (so at most checkpoint_every steps are ever lost).
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def note_restart(self, record: dict) -> None:
        """Rank 0 appends a line to RUN/<stage>/restarts.jsonl (where this node sees the run dir)."""
        d = Path(self.run_dir) / self.stage_rel
        if self.rank == 0 and d.exists():
            with open(d / "restarts.jsonl", "a") as f:
                f.write(json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def run_body(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: the stage body named in ``config`` in a RayContext."""
    body = config["body"]
    if not callable(body):
        raise BDGFError(f"not a stage body: {body!r}")
    body(config["job"], RayContext(config["launch"]))
