# Two entry points for a fresh machine (see README):
#   make demo   -> creates .venv, installs vlmalign, runs `vlmalign quickstart`
#   make test   -> creates .venv, installs vlmalign[dev] (and, best effort, headless Chromium for the
#                  web demo's browser test: scripts/install_browser.sh), runs the offline test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= runs/quickstart

.PHONY: setup setup-dev demo test clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	bash scripts/install_torch.sh $(PY)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	-bash scripts/install_browser.sh
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlmalign quickstart --out $(OUT) --overwrite

test: setup-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache
