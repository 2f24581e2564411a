# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-data venv clean chromium java

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first (the CPU build on these machines; see README for CUDA), then the package and its dev extras.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dualsearch demo --out demo-out

# Debian's Chromium + ChromeDriver for the browser test (a test tool's own browser download fails here)
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "warning: could not install chromium; the browser test will be skipped"; }

# A headless Java 17 runtime for Spark (pyspark 4 runs its JVM in local mode for the tests)
java:
	@command -v java >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null) || \
	  { echo "error: Spark needs Java 17+: apt-get install openjdk-17-jre-headless"; exit 1; }

# habits first (seconds): lint, then the architecture contract (layers, no cycles; pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

test: lint chromium java
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# the real sets of bench/quality.py (bench/realdata.py): Debian's Tux Paint stamps and Oxygen icons, CairoSVG
bench-data: $(STAMP)
	@test -d /usr/share/tuxpaint/stamps && test -d /usr/share/icons/oxygen/base || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tuxpaint-stamps-default \
	   oxygen-icon-theme >/dev/null)
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/realdata.py

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-out build *.egg-info src/*.egg-info
