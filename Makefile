# Two commands a newcomer needs:
#   make chat   set up, build the default model bundle (SmolLM2-135M-Instruct), talk to an NPC
#   make test   set up, run the whole test suite (what CI runs)
#   make demo   set up, build the default model bundle, play the pygame village (headless: scripted run)
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
