VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline
export HYDRA_FULL_ERROR := 1

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m flmm_lightning.train +experiment=demo

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

bench: setup
	$(PY) -m flmm_lightning.bench --size tiny --out outputs/bench/tiny.json

clean:
	rm -rf outputs wandb lightning_logs multirun .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
