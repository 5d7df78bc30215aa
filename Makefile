# One entry point for every stage. `make demo` runs the whole pipeline on the embedded tiny default;
# `make test` runs the test suite. Both set up the virtual environment first.

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# On GPU machines pass your CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
RECIPE     ?= recipes/tiny.yaml
TINY       := artifacts/tiny-omni
SYNTH      := artifacts/synthetic

.PHONY: setup tiny data train merge demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

tiny: $(TINY)/config.json
$(TINY)/config.json: | setup
	$(PY) -m infer.tiny $(TINY)

data: $(SYNTH)/test.jsonl
$(SYNTH)/test.jsonl: | setup
	$(PY) -m data_prep.synthetic $(SYNTH)

train: tiny data
	$(PY) train/sft.py $(RECIPE)

# Fold the tiny run's adapter into a plain checkpoint (for vLLM or any LoRA-less loader).
merge: train
	$(PY) train/merge.py --base $(TINY) --adapter runs/tiny/adapter --out runs/tiny/merged

demo: tiny data
	@echo "demo: tiny checkpoint in $(TINY), synthetic benchmark in $(SYNTH)"

test: setup
	$(PY) -m pytest

clean:
	rm -rf artifacts runs
