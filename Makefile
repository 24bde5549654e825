# Two commands from a clean clone:  `make repro`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DVC    := $(VENV)/bin/dvc
PYTEST_ARGS ?=

.PHONY: setup data repro test test-slow lint report bench clean-venv help

help:
	@echo "make repro  - set up .venv, fetch the default dataset, run the whole DVC pipeline"
	@echo "make test   - set up .venv and run the test suite (not the slow tests)"
	@echo "make test-slow / lint / report / bench"

# The venv is rebuilt when pyproject.toml changes. torch/torchvision are pinned in pyproject.toml
# (2.14.1 / 0.29.1); dvc-s3 and moto[server] come in the same pip call through the `dev` extra.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip check
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -m dsink.data.fetch

repro: setup data
	$(DVC) repro

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check dsink stages tests bench

clean-venv:
	rm -rf $(VENV)

report: setup
	$(PY) -m dsink.report --out report.html

# `dvc plots show` as dvc_plots/index.html with vega/vega-lite/vega-embed inlined: opens offline (no CDN).
# The JavaScript is cached in .dsink/vendor/ (fetched once with `npm pack` when missing).
.PHONY: plots
plots: setup
	$(PY) -m dsink.plots_page --out dvc_plots
