# Two commands on a fresh machine:  `make demo` (install + compile + run a preset model) and
# `make test` (install + the test suite; .ci/run calls exactly this).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mllmc-installed

.PHONY: install demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch that lies on this machine's disk; a bare `torch` pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[compile,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mllmc preset tiny-llava -o models/tiny-llava --force
	$(BIN)/mllmc compile models/tiny-llava --pass shortv -o out/tiny-shortv --force
	$(BIN)/mllmc inspect out/tiny-shortv
	$(BIN)/mllmc run out/tiny-shortv --image examples/images/shapes.png --prompt "Describe the image." --max-new-tokens 16
	$(BIN)/mllmc bench models/tiny-llava --pass shortv --repeats 5 -o out/bench/tiny-shortv.json --force

test: install
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m ""

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/baseline.py
	$(BIN)/python benchmarks/shortv.py

clean:
	rm -rf models out .pytest_cache
