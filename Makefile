# Two commands do all the set-up: `make demo` and `make test`. Both create what they need.
PYTHON ?= python3.11
VENV := .venv
VENV_TRITON := .venv-triton
VENV_KFP := .venv-kfp
VENV_OPTIMUM := .venv-optimum
BIN := $(VENV)/bin
# Telemetry off for everything started from here (the Python code sets it too).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export AIRFLOW__USAGE_DATA_COLLECTION__ENABLED := False
export SCARF_ANALYTICS := false
# The slowest tests are listed after each run, to keep make test within its time budget.
PYTEST_ARGS ?= --durations=30

.PHONY: help envs demo-postgres down-postgres purge-postgres venv venv-triton venv-kfp venv-optimum perf-analyzer bench bench-triton bench-pipeline browser-deps kubeflow demo demo-drift demo-latency demo-multimodel test test-slow test-faults bench-compress bench-monitor bench-drift bench-batch bench-attention bench-multiclass bench-soak bench-full bench-gpu load-test up down status assets clean-stack

help:
	@echo "make demo       create environments, start the local stack, run optimize_model end to end"
	@echo "make demo-drift after make demo: normal then shifted traffic, the monitor triggers a retrain (~20 min)"
	@echo "make demo-latency after make demo: a slow champion breaches the p95 SLO, the monitor triggers a re-optimization (~15 min)"
	@echo "make demo-multimodel after make demo: a topic classifier served beside the sentiment one, each on its own route and monitor (~20 min)"
	@echo "make test       create environments and run the test suite"
	@echo "make test-faults  kill -9 Triton, the gateway, MLflow, a Celery worker, the scheduler; full disk, a corrupted model, the prediction log database cut off (~9-15 min) -> bench/results/faults.md"
	@echo "make test-slow  the long checks (real demo assets, the browser test in headless Chromium)"
	@echo "make bench       every benchmark (~1 h): compression + Optimum peer, Triton vs in-process, pipeline cost -> bench/results/bench.md"
	@echo "make bench-triton    the promoted model through Triton (perf_analyzer) vs in-process ONNX Runtime -> bench/results/triton-e2e.{json,md}"
	@echo "make bench-pipeline  one optimize_model run on the demo profile: wall time, peak memory per task -> bench/results/pipeline-cost.{json,md}"
	@echo "make bench-compress  every compression technique on the demo assets -> bench/results/compress-demo.{json,md}"
	@echo "make bench-monitor   one monitoring window over 10,000 logged predictions -> bench/results/monitor.json"
	@echo "make bench-drift     false alarms and detection per shift family and window size, demo model (~15 min) -> bench/results/drift.{json,md}"
	@echo "make bench-batch     after make demo: each served format's answers alone vs batched (label flips, logit change) -> bench/results/batch-invariance.{json,md}"
	@echo "make bench-multiclass the recipe end to end on demo:reuters8 (8 imbalanced topics), gates by accuracy and macro-F1, teacher 1 vs 3 epochs -> bench/results/multiclass.{json,md}"
	@echo "make bench-soak      10 min at 20 requests/s through the gateway, a promotion and a rollback midway: 5xx, RSS per service, log count -> bench/results/soak.{json,md}"
	@echo "make bench-full      the strong-teacher run of record (hours): full profile through the local stack, teacher vs promoted model -> bench/results/full.{json,md}"
	@echo "make bench-attention after make demo: eager vs SDPA attention in PyTorch on this CPU (inference, training step) -> bench/results/attention.{json,md}"
	@echo "make bench-gpu       on an NVIDIA GPU: teacher and students in PyTorch FP32/FP16 (SDPA, flash) and TensorRT -> bench/results/gpu.{json,md}"
	@echo "make load-test       60 s of steady single-text requests to the local gateway -> bench/results/load-local.{json,md}"
	@echo "make kubeflow        compile optimize_model for Kubeflow Pipelines -> build/optimize_model.kfp.yaml"
	@echo "make up|down|status  start, stop or inspect the local stack"
	@echo "make demo-postgres   make demo in the production configuration: PostgreSQL, CeleryExecutor with two workers on Redis"
	@echo "make down-postgres|purge-postgres  stop that stack; drop its databases and broker keys"

venv: $(VENV)/.installed
# The four environments are independent: built side by side (pip waits on disk as much as on the CPU).
envs:
	@$(MAKE) --no-print-directory -j4 venv venv-triton venv-kfp venv-optimum
venv-triton: $(VENV_TRITON)/.installed
venv-kfp: $(VENV_KFP)/.installed
venv-optimum: $(VENV_OPTIMUM)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# The Triton runtime: a real tritonserver 2.51 from the nvidia-pytriton wheel (installed without
# its dependencies), plus what the python backend models need. numpy<2: the python backend
# returns empty tensors with numpy 2.
$(VENV_TRITON)/.installed: requirements-triton.lock
	@test -x $(VENV_TRITON)/bin/python || $(PYTHON) -m venv $(VENV_TRITON)
	$(VENV_TRITON)/bin/pip install --quiet --disable-pip-version-check -r requirements-triton.lock
	$(VENV_TRITON)/bin/pip install --quiet --disable-pip-version-check --no-deps nvidia-pytriton==0.7.0
	@touch $@

# Kubeflow Pipelines compiler only (kfp pins protobuf/click versions the main environment cannot share).
$(VENV_KFP)/.installed: requirements-kfp.lock
	@test -x $(VENV_KFP)/bin/python || $(PYTHON) -m venv $(VENV_KFP)
	$(VENV_KFP)/bin/pip install --quiet --disable-pip-version-check -r requirements-kfp.lock
	@touch $@

# The peer baseline of the benchmarks: Hugging Face Optimum (optimum-onnx pins transformers<4.58).
$(VENV_OPTIMUM)/.installed: requirements-optimum.lock
	@test -x $(VENV_OPTIMUM)/bin/python || $(PYTHON) -m venv $(VENV_OPTIMUM)
	$(VENV_OPTIMUM)/bin/pip install --quiet --disable-pip-version-check -r requirements-optimum.lock
	@touch $@

# NVIDIA perf_analyzer from the tritonclient 2.51.0 wheel (matching the server), with the CUDA
# runtime library it links (no GPU needed) from NVIDIA's wheel, and libb64 from Debian.
PERF_ANALYZER := .tools/perf_analyzer/perf_analyzer
perf-analyzer: $(PERF_ANALYZER)
$(PERF_ANALYZER): | venv
	@dpkg -s libb64-0d >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libb64-0d; }
	@rm -rf .tools/perf_analyzer.tmp && mkdir -p .tools/perf_analyzer.tmp
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps -d .tools/perf_analyzer.tmp \
		tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79
	cd .tools/perf_analyzer.tmp && unzip -q -j -o tritonclient-2.51.0-*.whl 'tritonclient-2.51.0.data/data/bin/perf_analyzer' \
		&& unzip -q -j -o nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' \
		&& chmod +x perf_analyzer && rm -f *.whl
	@rm -rf .tools/perf_analyzer && mv .tools/perf_analyzer.tmp .tools/perf_analyzer
	@LD_LIBRARY_PATH=.tools/perf_analyzer $(PERF_ANALYZER) --version

# optimize_model as a Kubeflow Pipelines YAML (upload it in the Kubeflow UI or with the kfp client).
kubeflow: venv-kfp
	PYTHONPATH=. $(VENV_KFP)/bin/python infra/kubeflow/pipeline.py --output build/optimize_model.kfp.yaml

up: venv venv-triton
	$(BIN)/opsctl up

down:
	@if [ -x $(BIN)/opsctl ]; then $(BIN)/opsctl down; else echo "nothing to stop: no environment"; fi

status: venv
	$(BIN)/opsctl status

assets: venv
	$(BIN)/opsctl fetch-assets

demo: venv venv-triton
	$(BIN)/opsctl up
	$(BIN)/opsctl demo

# After `make demo` (needs a champion): the monitoring loop, drift -> trigger -> retrain -> gates.
demo-drift: venv venv-triton
	$(BIN)/opsctl up
	$(BIN)/opsctl demo-drift

# After `make demo` (needs a champion): the latency loop, slow champion -> breach -> re-optimize within budget.
demo-latency: venv venv-triton
	$(BIN)/opsctl up
	$(BIN)/opsctl demo-latency

# After `make demo`: a topic classifier (Reuters R8, eight news topics) served beside the sentiment one.
demo-multimodel: venv venv-triton
	$(BIN)/opsctl up
	$(BIN)/opsctl demo-multimodel

test: envs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Headless Chromium and its driver for the browser test (Debian packages; root or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test-slow: envs browser-deps perf-analyzer
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The fault suite (tests/faults): real processes killed with SIGKILL, a full disk, a corrupted model file, the
# prediction log's database cut off under traffic.
test-faults: venv venv-triton
	FAULTS_REPORT=bench/results/faults.md $(BIN)/python -m pytest -m faults tests/faults $(PYTEST_ARGS)

# The soak (tests/faults/test_soak.py, marker soak): its own stack, SOAK_SECONDS (default 600) of traffic.
SOAK_SECONDS ?= 600
bench-soak: venv venv-triton
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench/results/soak.md $(BIN)/python -m pytest -m soak tests/faults/test_soak.py $(PYTEST_ARGS)

# ~25 minutes on 2 cores; exits 2 when a target of the compression issue is not met.
bench-compress: venv venv-optimum
	$(BIN)/python -m bench.compress --profile demo

# Every benchmark in one go (~1 hour on 2 cores), then every target on one page: bench/results/bench.md.
# BENCH_COMPRESS_ARGS=--measure-only reuses the models built by an earlier run. Exit 2: a target missed.
BENCH_COMPRESS_ARGS ?=
bench: venv venv-triton venv-optimum perf-analyzer
	$(BIN)/python -m bench.compress --profile demo $(BENCH_COMPRESS_ARGS) || [ $$? -eq 2 ]
	$(BIN)/python -m bench.triton_e2e || [ $$? -eq 2 ]
	$(BIN)/opsctl up
	$(BIN)/python -m bench.pipeline_cost || [ $$? -eq 2 ]
	$(BIN)/python -m bench.summary

# Needs the models of make bench-compress; starts its own Triton on free ports.
bench-triton: venv venv-triton perf-analyzer
	$(BIN)/python -m bench.triton_e2e

bench-monitor: venv
	$(BIN)/python -m bench.monitor

# Fine-tunes the demo teacher (the pipeline's stages) and judges windows of held-out and shifted texts.
bench-drift: venv
	$(BIN)/python -m bench.drift

# After `make demo`: the newest run's FP32 exports in every served format, alone versus batched.
bench-batch: venv
	$(BIN)/python -m bench.batch_invariance

# After `make demo`: the newest run's teacher with eager and SDPA attention, interleaved rounds.
bench-attention: venv
	$(BIN)/python -m bench.attention

# The pipeline end to end on demo:reuters8 (8 imbalanced news topics), teacher at 1 and 3 epochs.
bench-multiclass: venv
	$(BIN)/python -m bench.multiclass

# Needs a CUDA GPU (without one it says so and measures nothing); TensorRT where the tensorrt package is
# installed. On a bare GPU machine without this environment: OUT=<folder> bash bench/gpu_check.sh.
bench-gpu: venv
	$(BIN)/python -m bench.gpu

# The strong-teacher run of record (issue 23; hours on a CPU): optimize_model with the full profile through
# the local stack, then the teacher's and the promoted model's figures: bench/results/full.md. Exit 2: a target
# missed. BENCH_FULL_ARGS="--run-dir <folder> --conf '<params>'" measures a finished run again.
BENCH_FULL_ARGS ?=
bench-full: venv venv-triton
	$(BIN)/opsctl up
	$(BIN)/python -m bench.full $(BENCH_FULL_ARGS)

# optimize_model on the demo profile through the local stack's scheduler: time and memory per task.
bench-pipeline: venv venv-triton
	$(BIN)/opsctl up
	$(BIN)/python -m bench.pipeline_cost

# Needs the local stack with a promoted champion (make demo).
load-test: venv
	$(BIN)/python -m bench.load_test --rate 20 --duration 60

# The production configuration (docs/configuration.md, "Production configuration"): Airflow, MLflow and the
# prediction log on the PostgreSQL server POSTGRES_URL names, Airflow's CeleryExecutor with two workers on the
# Redis broker REDIS_URL. Its own home (.stack-postgres), so it never mixes with the SQLite stack of `make demo`.
POSTGRES_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
REDIS_URL ?= redis://127.0.0.1:6379/0
PRODUCTION_ENV := PIPELINE_HOME=$(CURDIR)/.stack-postgres PIPELINE_DATABASE_URL=$(POSTGRES_URL) PIPELINE_CELERY_BROKER_URL=$(REDIS_URL)

demo-postgres: venv venv-triton
	$(PRODUCTION_ENV) $(BIN)/opsctl up
	$(PRODUCTION_ENV) $(BIN)/opsctl demo

down-postgres:
	@if [ -x $(BIN)/opsctl ]; then $(PRODUCTION_ENV) $(BIN)/opsctl down; else echo "nothing to stop: no environment"; fi

# Drops the databases and broker keys of .stack-postgres (refused while it runs); its files stay.
purge-postgres: venv
	$(PRODUCTION_ENV) $(BIN)/opsctl purge

clean-stack: down
	rm -rf .stack
