"""Ray Train + DeepSpeed for the stage drivers in :mod:`bdgf.engine`.

    launch.py    driver side: checks before launch, Ray connection, TorchTrainer, final files
    workers.py   worker side: RayContext (rank, device, DeepSpeed stepper, Ray checkpoints)
    steppers.py  DeepSpeed vs DDP: the one place the choice is made; DeepSpeed config templates
    faults.py    deterministic worker kills for the fault-tolerance test and benchmark

The stage bodies themselves (``pretrain_body``, ``train_body``) are the single-process ones; only
their context differs. Nothing here is imported unless a stage runs with ``workers > 0``.
"""
