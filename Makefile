# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use from the pinned, tested set in requirements/ (CPU by default).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ctr-installed

.PHONY: setup setup-gpu demo test test-fast bench bench-scale bench-frontier bench-optfs bench-edge bench-daily clean

$(STAMP): pyproject.toml requirements/cpu.txt requirements/common.txt requirements/onnx.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-deps -r requirements/cpu.txt
	$(BIN)/pip install --no-deps -r requirements/onnx.txt
	$(BIN)/pip install --no-deps -e .
	$(BIN)/python -c "import torch, fbgemm_gpu, torchrec; assert torch.version.cuda is None, 'expected the CPU torch build'"
	touch $(STAMP)

setup: $(STAMP)

# CUDA machines: torch + fbgemm-gpu CUDA builds at matching releases, with their nvidia-* runtime wheels.
setup-gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements/gpu.txt
	$(BIN)/pip install --no-deps -r requirements/common.txt
	$(BIN)/pip install --no-deps -r requirements/onnx.txt
	$(BIN)/pip install --no-deps -e .
	$(BIN)/python -c "import torch, fbgemm_gpu, torchrec; assert torch.cuda.is_available(), 'no CUDA device visible'"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ctr demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Every benchmark beside FuxiCTR 2.3.10 (its own venv under benchmarks/_work), about 30 min on 2 cores:
# writes benchmarks/RESULTS.md. ROWS=... sets the generated dataset's size.
ROWS ?= 1000000
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --rows $(ROWS)

# Criteo and Avazu at full size (profile-generated: 45.8M and 40.4M rows, min count 2): generate, prepare,
# one epoch, checkpoint, export, evaluate, FuxiCTR's prepare beside ours; hours on 2 cores and about 40 GB
# of disk under benchmarks/_work/scale. Writes the Scale section of benchmarks/RESULTS.md. Not part of CI.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py

# The compression frontier on 12.5M Criteo-profile rows: early-stopped and min-count baselines, the AFM + quantize
# recipe at 30x/100x/200x/300x budgets, Unified Embedding and hashing at equal table bytes, all on the same test rows with
# DeLong tests; about 2 hours on 2 cores. Writes the Frontier section of benchmarks/RESULTS.md. Not part of CI.
bench-frontier: $(STAMP)
	$(BIN)/python benchmarks/bench_frontier.py

# Day after day: 7 generated Avazu-profile days of 2M rows (a tenth of the values new each day); warm start
# every day against retraining from scratch on all days so far and against the day-1 model, each scored on
# the next day's raw rows; the DNN recipe's model warm-started too. About 2 hours on 2 cores. Writes the
# "Day after day" section of benchmarks/RESULTS.md and benchmarks/daily_auc.png. Not part of CI.
bench-daily: $(STAMP)
	$(BIN)/python benchmarks/bench_daily.py

# OptFS on generated sets with other seeds and other pure-noise fields, at about 72k and 2M table rows: the share of
# the noise fields' rows removed and the test AUC change, with DeLong; about 45 minutes on 2 cores. Writes the OptFS
# noise section of benchmarks/RESULTS.md. Not part of CI.
bench-optfs: $(STAMP)
	$(BIN)/python benchmarks/bench_optfs_noise.py

# Whole-file budgets on the Frontier's 12.5M Criteo-profile rows: the early-stopped min-count-2 baseline, then
# OptFS -> AFM -> quantize at 30x and 100x its whole file (vocabulary included); about 1 hour on 2 cores. Writes the
# Edge budget section of benchmarks/RESULTS.md. Not part of CI.
bench-edge: $(STAMP)
	$(BIN)/python benchmarks/bench_edge_budget.py

clean:
	rm -rf data/prepared runs benchmarks/_work
