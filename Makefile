# Everything a fresh machine needs: `make demo` (the main job end to end) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where torch comes from. Empty: pip's configured index (PyPI, or your pip.conf). PyPI's Linux
# x86_64 torch is the multi-GB CUDA build; on a machine without a GPU use PyTorch's CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIN := $(shell grep '^torch==' constraints.txt)
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-cuda demo test test-slow two-node bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned, from TORCH_INDEX: every later resolution then sees it already installed.
	$(BIN)/pip install -q -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH_PIN)'
	$(BIN)/pip install -q -c constraints.txt -e '.[distributed,export,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bdgf demo --out demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Two Ray nodes on this machine: jobs, Serve on that cluster, teardown (infra/two_node_local.sh).
two-node: $(STAMP)
	BIN=$(abspath $(BIN)) bash infra/two_node_local.sh

# Long measurements (minutes to tens of minutes); figures go to benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_kernels.py
	$(BIN)/python benchmarks/bench_dense_features.py --results benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_tile_invariance.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_defaults.py
	$(BIN)/python benchmarks/bench_masking.py --preset imbalance
	$(BIN)/python benchmarks/bench_masking.py --preset hard
	$(BIN)/python benchmarks/bench_val_split.py
	$(BIN)/python benchmarks/bench_reads.py
	$(BIN)/python benchmarks/bench_stages.py --results benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_ablation.py --results benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_backends.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_bulk.py

# GPU hosts: the `cuda` extra (mamba-ssm, causal-conv1d compile against the installed torch with
# nvcc, hence --no-build-isolation; tensorrt downloads from NVIDIA's host).
install-cuda: $(STAMP)
	@command -v nvcc >/dev/null || { echo "install-cuda: nvcc not found (mamba-ssm and causal-conv1d compile with the CUDA toolkit)"; exit 1; }
	$(BIN)/pip install -q -c constraints.txt packaging ninja wheel 'setuptools>=69'
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e '.[cuda]'

# The GPU smoke check (needs a CUDA device; on a machine without one it says so and exits 2):
# stages 1 and 2 in bf16 through Ray + DeepSpeed on 1 GPU worker, the Triton kernels against
# their references at the GPU's block sizes (the `gpu` tests), and the kernel benchmark.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf $(VENV) demo
