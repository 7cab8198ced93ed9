# Two set-up commands: `make demo` and `make test`. Both create or reuse .venv and
# install what they need, the pinned CPU torch wheel first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tensorlotr-installed
TORCH  := torch==2.13.0
JOBS   ?= 2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench install clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tensorlotr demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) $(PYTEST_ARGS)

# the documentation site into site/ (git-ignored); any warning fails the build
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# style (ruff) and static types (mypy over tensorlotr/, strict: see [tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check tensorlotr tests bench examples
	$(BIN)/ruff format --check tensorlotr tests bench examples
	$(BIN)/mypy tensorlotr

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache
