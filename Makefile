# Everything a fresh machine needs: `make demo` (the main job end to end) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: every later resolution then sees the CPU build already installed.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[distributed,export,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bdgf demo --out demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

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
	$(BIN)/python benchmarks/bench_stages.py --results benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_ablation.py --results benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) demo
