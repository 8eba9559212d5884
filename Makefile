# The two commands a new user needs: `make demo` and `make test`. Both run `setup` first when
# .venv is missing. Every pip call goes through constraints.txt (CPU torch, pinned stack).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
PRESET ?= tiny
WORK ?= work_dirs/demo
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser demo test test-fast bench clean

setup: $(VENV)/.installed

# torch first (the CPU wheel), then DeepSpeed built against it with its CPU comm op compiled now
# rather than JIT-compiled (~70 s) by the first engine of every fresh machine, then the rest of
# the stack in one resolver call so nothing downgrades what another package needs.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q torch==2.13.0 torchvision==0.28.0 setuptools wheel ninja packaging
	DS_BUILD_SHM_COMM=1 $(PIP) -q --no-build-isolation --no-cache-dir deepspeed==0.19.8
	$(PIP) -q --no-build-isolation -e '.[dev]'
	$(PY) -c 'from storygpt.compat import check; check()'
	$(MAKE) --no-print-directory browser
	touch $@

# The web page's test drives Debian's headless Chromium (no browser download); skipped, and
# reported by `make test`, where it cannot be installed.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; } || \
	  echo "WARNING: could not install chromium + chromium-driver: tests/test_web.py will be skipped"

demo: setup
	$(VENV)/bin/storygpt demo --config configs/$(PRESET).yaml --work-dir $(WORK)

test: setup
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(WORK) .pytest_cache
