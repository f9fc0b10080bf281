# quantlab: `make run` sets up .venv (once) and executes every notebook; `make test` runs all tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: all setup run test lint unit nbval notebooks exercises lab weights benchmark clean

all: run

# One install per change of pyproject.toml / constraints.txt; later runs take seconds.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[notebooks,test]'
	touch $(STAMP)

setup: $(STAMP)

## Execute every notebook in order into build/notebooks (the committed ones are not touched).
run: $(STAMP)
	$(PY) scripts/run_notebooks.py --out build/notebooks $(NOTEBOOKS)

## Lint, unit tests (the exercise checker included) and nbval over every notebook and the exercise solutions.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg -p no:cacheprovider notebooks exercises/solutions

lint: $(STAMP)
	$(PY) -m ruff check .

## Re-execute the notebooks in place, storing their outputs (commit the result).
notebooks: $(STAMP)
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
		../$(PY) -m jupyter nbconvert --to notebook --execute --inplace $$nb || exit 1; done

## Rebuild exercises/ (templates) and exercises/solutions/ from scripts/build_exercises.py, executed.
exercises: $(STAMP)
	$(PY) scripts/build_exercises.py

## JupyterLab on the repository root: notebooks/ (lessons) and exercises/ side by side.
## Jupyter refuses to run as root without --allow-root (containers): add it when uid is 0.
## More options: make lab LAB_ARGS="--no-browser --port 8890"
lab: $(STAMP)
	$(PY) -m jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

## Re-train the shipped checkpoints (quantlab/weights) with quantlab's own recipe.
weights: $(STAMP)
	$(PY) scripts/train_pretrained.py

benchmark: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis
