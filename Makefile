# Two commands on a fresh machine:  `make demo` (install + compile + run a preset model) and
# `make test` (install + the test suite; .ci/run calls exactly this).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mllmc-installed

.PHONY: install demo test test-serve test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch that lies on this machine's disk; a bare `torch` pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[compile,dev,torchao]'
	touch $(STAMP)

install: $(STAMP)

# The demo model is trained (shapes-qa, benchmarks/train_shapes_llava.py): it answers a question
# about the bundled image, without and with ShortV (LC order calibrated on shapes-qa train items),
# and `mllmc eval` scores both on the same held-out items. The bundled image is shapes-qa held-out
# item 100000004 (answer: yellow).
DEMO_IMAGE  := examples/images/shapes-qa.png
DEMO_PROMPT := What colour is the circle?
DEMO_SHORTV := shortv:ratio=0.5,lc=out/trained-lc.json

demo: install
	$(BIN)/mllmc preset trained-tiny-llava -o models/trained-tiny-llava --force
	$(BIN)/mllmc calibrate models/trained-tiny-llava --task shapes-qa -n 32 -o out/trained-lc.json --force --no-plot -q
	$(BIN)/mllmc compile models/trained-tiny-llava -o out/trained --force -q
	$(BIN)/mllmc compile models/trained-tiny-llava --pass $(DEMO_SHORTV) -o out/trained-shortv --force -q
	$(BIN)/mllmc verify out/trained-shortv --against models/trained-tiny-llava
	$(BIN)/mllmc run out/trained --image $(DEMO_IMAGE) --prompt "$(DEMO_PROMPT)" --max-new-tokens 4
	$(BIN)/mllmc run out/trained-shortv --image $(DEMO_IMAGE) --prompt "$(DEMO_PROMPT)" --max-new-tokens 4
	$(BIN)/mllmc eval out/trained --task shapes-qa -n 200 -q
	$(BIN)/mllmc eval out/trained-shortv --task shapes-qa -n 200 -q
	$(BIN)/mllmc bench models/trained-tiny-llava --pass $(DEMO_SHORTV) --repeats 5 -o out/bench/trained-shortv.json --force

# one pytest worker per core (at most 4), each test module on one worker so that its fixtures
# (compiled artifacts) are built once; a plain `pytest` runs serially
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: install
	$(BIN)/lint-imports
	$(BIN)/pytest -q $(XDIST) -rf --durations=20
	$(MAKE) test-serve

# The server tests run in a venv of their own: PyTriton (the `serve` extra) pins numpy < 2, and
# the main venv keeps numpy 2 (there they skip, saying why)
SERVE_VENV  ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.mllmc-installed

$(SERVE_STAMP): pyproject.toml
	$(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q torch==2.13.0
	$(SERVE_VENV)/bin/pip install -q -e '.[compile,dev,serve]'
	touch $(SERVE_STAMP)

test-serve: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/pytest -q -p no:xdist tests/compiler/tools/test_serve.py

test-all: install
	$(BIN)/pytest -q $(XDIST) -m ""

lint: install
	$(BIN)/lint-imports
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
