# Set-up is idempotent: the first target run creates .venv; later runs reuse it unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
PYTEST_ARGS ?=
BENCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmr-installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,serve,milvus]" "$(TORCH_SPEC)"
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit('torchvision must not be installed (it breaks with this torch)' if u.find_spec('torchvision') else 0)"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xmr demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/_run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .cache runs
