# `make demo` and `make test` create the virtual environment and install everything they need.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline by design: nothing is fetched from a model hub; one thread per torch process.
RUN_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	# bitsandbytes (8-bit AdamW, the original recipe's optimizer) only where it can run: a machine with a CUDA GPU.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install --quiet "bitsandbytes>=0.45"; fi
	# Debian's chromium for the study page's browser tests (as root with apt-get; elsewhere they skip saying why, and fail under CI).
	if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
	touch $@

demo: install
	$(RUN_ENV) bash demo.sh

test: install
	$(RUN_ENV) $(BIN)/python -m pytest -q

# The inner loop: everything but the end-to-end runs (pytest's `slow` marker).
test-fast: install
	$(RUN_ENV) $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs
