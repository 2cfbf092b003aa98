# ovbook: two commands do everything on a fresh machine with Python 3.11 and access to PyPI.
#   make book   - create .venv if missing, install, execute every chapter (micro profile), build _build/html
#   make test   - create .venv if missing, install, lint (ruff check .), run the whole test suite, slow tests
#                 included (offline; what CI runs). `make test-all` is the same; `make test-quick` leaves out the
#                 tests marked slow.
#   make install-locked - install the exact, hash-checked versions of requirements/lock.txt (the published book's)
#   make lock   - regenerate requirements/lock.txt from pyproject.toml (after changing dependencies)
#   make fingerprints - regenerate tests/fixtures/dense_fingerprints.json (after an intended change of dense_features)
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
LOCK    := requirements/lock.txt

.PHONY: book run build test test-all test-quick bench install install-locked lock fingerprints clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[book,test]'
	@touch $(STAMP)

install: $(STAMP)

# The exact environment: every package pinned with its hashes, then ovlib itself (editable, no dependencies).
install-locked:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --require-hashes -r $(LOCK)
	$(PY) -m pip install --no-deps -e .
	@touch $(STAMP)

# One command after any change of dependencies in pyproject.toml (book + test extras, Python 3.11, all platforms;
# requirements/constraints.txt caps torch/torchvision at the fingerprinted releases). Needs only network access.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q 'uv>=0.5'
	$(PY) -m uv pip compile pyproject.toml --extra book --extra test --universal --python-version 3.11 \
		--generate-hashes -c requirements/constraints.txt --custom-compile-command 'make lock' -o $(LOCK)

book: $(STAMP)
	$(PY) -m ovlib.book run --profile $(PROFILE) $(if $(ONLY),--only $(ONLY)) $(PARAMS)
	$(PY) -m ovlib.book build

run: $(STAMP)
	$(PY) -m ovlib.book run --profile $(PROFILE) $(if $(ONLY),--only $(ONLY)) $(PARAMS)

build: $(STAMP)
	$(PY) -m ovlib.book build

test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(PY) -m pytest -m ''

test-all: test

test-quick: $(STAMP)
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(PY) -m pytest -m 'not slow'

bench: $(STAMP)
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(PY) benchmarks/run.py $(BENCH)

fingerprints: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m tests.helpers.dense_fingerprints --write

clean:
	rm -rf _build book/[0-9][0-9]_*.ipynb book/.stamps book/_work
