# Two commands from a fresh clone: `make demo` (the main job) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
OUT ?= out/demo
export PYTHONHASHSEED := 0

.PHONY: demo test bench lint install clean fuzz

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	@touch $(BENCH_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/compactnn demo --out $(OUT) --force

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

# 600 seeded mutations of each kind (bytes, header, rehashed header, tensors); prints the counts
fuzz: $(STAMP)
	COMPACTNN_FUZZ_CASES=600 $(BIN)/python -m pytest -p no:randomly -s tests/export/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: $(BENCH_STAMP)
	$(BIN)/python -m compactnn.bench --out docs/benchmarks.md

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
