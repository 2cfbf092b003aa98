# ovbook: two commands do everything on a fresh machine with Python 3.11 and access to PyPI.
#   make book   - create .venv if missing, install, execute every chapter (micro profile), build _build/html
#   make test   - create .venv if missing, install, run the whole test suite, slow tests included (offline; what CI
#                 runs). `make test-all` is the same; `make test-quick` leaves out the tests marked slow.
# Variables: PROFILE (micro|smoke|paper), ONLY ("01 02"), PARAMS ("-p key=value ..."), BENCH ("--quick --only methods"),
#            VENV, PYTHON.

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    ?= .venv
PROFILE ?= micro
ONLY    ?=
PARAMS  ?=
BENCH   ?=
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ovbook-installed

.PHONY: book run build test test-all test-quick bench install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[book,test]'
	@touch $(STAMP)

install: $(STAMP)

book: $(STAMP)
	$(PY) -m ovlib.book run --profile $(PROFILE) $(if $(ONLY),--only $(ONLY)) $(PARAMS)
	$(PY) -m ovlib.book build

run: $(STAMP)
	$(PY) -m ovlib.book run --profile $(PROFILE) $(if $(ONLY),--only $(ONLY)) $(PARAMS)

build: $(STAMP)
	$(PY) -m ovlib.book build

test: $(STAMP)
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(PY) -m pytest -m ''

test-all: test

test-quick: $(STAMP)
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(PY) -m pytest -m 'not slow'

bench: $(STAMP)
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(PY) benchmarks/run.py $(BENCH)

clean:
	rm -rf _build book/[0-9][0-9]_*.ipynb book/.stamps book/_work
