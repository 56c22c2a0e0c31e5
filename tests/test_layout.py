"""The package boundaries: `bdgf` is the library; `training/` and `serving/` are deployments on it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_bdgf_and_its_cli_loads_no_deployment_package():
    code = ("import sys, bdgf, bdgf.cli, bdgf.engine.pretrain, bdgf.engine.classify, bdgf.engine.features, "
            "bdgf.pipeline, bdgf.distributed.launch, bdgf.distributed.workers; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'serving')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_library_module_names_a_deployment_package():
    """Also imports that only run inside functions (the old cycle was one of those)."""
    offenders = []
    for path in (REPO / "bdgf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("training", "serving")]
    assert offenders == []


def test_training_scripts_are_the_one_command_line():
    """`python training/<stage>.py --help` is `bdgf <stage> --help` (no second argument parser)."""
    for stage in ("pretrain", "features", "train"):
        script = subprocess.run([sys.executable, str(REPO / "training" / f"{stage}.py"), "--help"],
                                capture_output=True, text=True, timeout=300)
        cli = subprocess.run([sys.executable, "-m", "bdgf.cli", stage, "--help"], capture_output=True, text=True,
                             timeout=300)
        assert script.returncode == 0 and cli.returncode == 0, script.stderr + cli.stderr
        assert "--workers" in script.stdout
        strip = lambda s: "\n".join(line for line in s.splitlines() if "Usage:" not in line)  # noqa: E731
        assert strip(script.stdout) == strip(cli.stdout)
