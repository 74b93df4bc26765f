# Every target that needs Python first makes sure .venv exists and matches pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export EDGEFLEET_CACHE ?= $(CURDIR)/.cache/edgefleet

.PHONY: install assets test check protos demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) assets

# Pretrained models, photos and labels for the demo and the tests; fast when the cache is warm.
assets: $(STAMP)
	$(BIN)/python -m edgefleet.demo.assets fetch --cache $(EDGEFLEET_CACHE)

# Two workers: most tests wait on subprocesses, sockets and timers, so two run well on two cores.
# --dist loadfile keeps each file on one worker, so module fixtures (trained models) are built once.
TEST_WORKERS ?= 2

test: install
	EDGEFLEET_REQUIRE_POSTGRES=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python scripts/gen_api_docs.py --check

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/python scripts/gen_api_docs.py

demo: install
	$(BIN)/edgefleet demo --report demo-out/report.json

bench: install
	for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .cache demo-out .pytest_cache .mypy_cache .ruff_cache
