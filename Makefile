# quantlab: `make run` sets up .venv (once) and executes every notebook; `make test` runs all tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DOCS_STAMP := $(VENV)/.installed-docs-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: all setup run test test-portable lint unit nbval notebooks exercises lab weights benchmark book book-zh \
	translations chromium clean

all: run

# One install per change of pyproject.toml / constraints.txt; later runs take seconds.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[notebooks,test]'
	touch $(STAMP)

setup: $(STAMP)

# The book's tools (Sphinx, myst-nb, the theme, offline MathJax, selenium): the `docs` extra.
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

## Headless Chromium, its driver and a CJK font for the book's browser test (Debian's packages).
## Installs only what is missing, as root; elsewhere tests/test_book.py skips its browser checks.
chromium:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && [ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium chromium-driver fonts-wqy-zenhei (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q chromium chromium-driver fonts-wqy-zenhei >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver fonts-wqy-zenhei >/dev/null; }; } \
		|| echo "chromium: apt-get failed; the book's browser test will skip"; \
	else echo "chromium: not installed and not root (apt-get install chromium chromium-driver); the book's browser test will skip"; fi

## The HTML book from the stored notebooks (no execution, no network): build/book/html/index.html
book: $(DOCS_STAMP)
	$(PY) scripts/build_book.py $(if $(filter zh_CN,$(LANG)),--language zh_CN)

## The Chinese book beside it, from the catalogs in docs/locale/zh_CN: build/book/zh_CN/html/index.html
## (`make book LANG=zh_CN` builds only that one); every page links to the same page of the other edition
book-zh: $(DOCS_STAMP)
	$(PY) scripts/build_book.py --language zh_CN

## The Chinese edition's sources: re-extract the English prose into the catalogs (new messages
## untranslated, changed ones fuzzy), then regenerate notebooks/zh and exercises/zh from them.
## Translating = filling msgstr entries in docs/locale/zh_CN/LC_MESSAGES/*.po, then `make translations`.
translations: $(DOCS_STAMP)
	$(PY) scripts/translations.py

## Execute every notebook in order into build/notebooks (the committed ones are not touched).
run: $(STAMP)
	$(PY) scripts/run_notebooks.py --out build/notebooks $(NOTEBOOKS)

## Lint, unit tests (the exercise checker and the book's browser test included) and nbval over every
## notebook and the exercise solutions.
## One pytest run on two workers (pytest-xdist): each file (a notebook's cells, in order, in one kernel)
## stays on one worker; the notebooks go first so the longest ones do not finish last.
## nbval compares the stored outputs, which are those of the embedded digits: QUANTLAB_MNIST=embedded here,
## whatever the shell says (QUANTLAB_MNIST=full make run executes the notebooks on full MNIST, unchecked).
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg
test: $(DOCS_STAMP) chromium
	$(PY) -m ruff check .
	QUANTLAB_MNIST=embedded OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -p no:cacheprovider $(NBVAL) notebooks exercises/solutions tests \
		--ignore=notebooks/zh

## The portability pass (CI runs it after `make test`): the notebooks, the exercise solutions and the
## unit tests once more with this machine's float kernels limited to another CPU's instruction set
## (scripts/kernel_config.py: AVX-512 -> AVX2, AVX2 -> SSE4.1). What nbval compares and what an
## assert requires exactly must not change: see "Every CPU" in the README.
KERNEL_CONFIG = $(shell $(PYTHON) scripts/kernel_config.py)
test-portable: $(STAMP)
	@echo "portability pass under: $(or $(KERNEL_CONFIG),the native configuration)"
	env $(KERNEL_CONFIG) $(PY) -c "import torch; print('ATen CPU capability:', torch.backends.cpu.get_cpu_capability())"
	env $(KERNEL_CONFIG) QUANTLAB_MNIST=embedded OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -p no:cacheprovider $(NBVAL) \
		notebooks exercises/solutions tests --ignore=tests/test_book.py --ignore=notebooks/zh

lint: $(STAMP)
	$(PY) -m ruff check .

## Re-execute the notebooks in place, storing their outputs (commit the result).
notebooks: $(STAMP)
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
		../$(PY) -m jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.store_widget_state=False $$nb || exit 1; done
	$(PY) scripts/clean_notebooks.py $(NOTEBOOKS)

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
	status=0; for b in benchmarks/bench_*.py; do $(PY) $$b || status=1; done; exit $$status

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis
