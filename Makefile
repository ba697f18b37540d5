VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline
export HYDRA_FULL_ERROR := 1
# glibc would return every large freed buffer to the OS and fault it back in on the next step; on VMs where
# page faults are expensive that made a CPU training step ~20x slower. Keep freed memory in the heap.
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 4294967296
export MALLOC_TOP_PAD_ := 536870912

.PHONY: setup demo app test test-fast lint bench docs figures dist clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m flmm_lightning.train +experiment=demo

# The web app over the demo checkpoint (http://127.0.0.1:7860; conf/app.yaml)
DEMO_CKPT := outputs/demo/latest/checkpoints/last.ckpt
app: setup
	@test -f $(DEMO_CKPT) || { echo "no demo checkpoint at $(DEMO_CKPT): run \`make demo\` first"; exit 1; }
	$(PY) -m flmm_lightning.app ckpt=$(DEMO_CKPT)

test: setup
	$(PY) -m pytest -q tests

# The edit-test loop: every test but those marked slow (`make test` and CI run them too)
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m flmm_lightning.bench --size tiny --out outputs/bench/tiny.json

# The documentation site (docs/, mkdocs.yml) into site/; a warning (broken link, missing reference) fails it
docs: setup
	$(VENV)/bin/mkdocs build --strict

# The pictures of the README and the docs (docs/assets/): the browser test's screenshots of the app, and the
# pipeline figure and validation overlays of a finished demo run (FIGURES_RUN=<run folder> picks another)
FIGURES_RUN := outputs/demo/latest
figures: setup
	@test -f $(FIGURES_RUN)/checkpoints/last.ckpt || { echo "no demo run at $(FIGURES_RUN): run \`make demo\` first"; exit 1; }
	FLMM_SCREENSHOT_DIR=outputs/figures/screens $(PY) -m pytest -q tests/test_app.py -k a_person_uploads
	$(PY) scripts/figures.py --run $(FIGURES_RUN) --screens outputs/figures/screens --out docs/assets

# The wheel (configs inside): pip install dist/flmm_lightning-*.whl
dist: setup
	$(PY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf outputs wandb lightning_logs multirun .pytest_cache build dist site
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
