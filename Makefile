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

.PHONY: setup tiny data prep train grpo merge infer eval encoder demo audit test bench clean

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
	$(PY) -m core.tiny $(TINY)

data: $(SYNTH)/test.jsonl
$(SYNTH)/test.jsonl: | setup
	$(PY) -m data_prep.synthetic $(SYNTH)

# The Cogito-Pipe on $(RECIPE) (tiny: the synthetic clips as the raw source, the tiny checkpoint as
# every model): manifest -> questions -> distilled reasoning -> verified SFT file, then the data card.
prep: tiny data
	$(PY) -m data_prep collect $(RECIPE) $(ARGS)
	$(PY) -m data_prep qa $(RECIPE) $(ARGS)
	$(PY) -m data_prep cot $(RECIPE) $(ARGS)
	$(PY) -m data_prep verify $(RECIPE) $(ARGS)
	$(PY) -m data_prep card $(RECIPE) $(ARGS)

# LoRA SFT; resumes from the latest checkpoint in train.output_dir. Extra overrides: ARGS="train.lr=1e-4".
train: tiny data
	$(PY) train/sft.py $(RECIPE) $(ARGS)

# GRPO from the tiny SFT run's adapter (recipes/grpo_tiny.yaml; resumes). Extra overrides: ARGS="train.stop_after=2".
grpo: tiny data
	$(PY) train/grpo.py recipes/grpo_tiny.yaml $(ARGS)

# Fold the tiny run's adapter into a plain checkpoint (for vLLM or any LoRA-less loader).
merge: | setup
	$(PY) train/merge.py --base $(TINY) --adapter runs/tiny/adapter --out runs/tiny/merged

# Answers the recipe's benchmark; resumes an interrupted run. Without a trained adapter: ARGS="infer.adapter=null".
infer: tiny data
	$(PY) -m infer run $(RECIPE) $(ARGS)

# Score a submission (default: the recipe's eval.submission); e.g. `make eval SUB=runs/x/submission.jsonl`.
eval: | setup
	$(PY) -m eval score $(RECIPE) $(if $(SUB),eval.submission=$(SUB))

# The whole pipeline on the tiny default: data -> train -> infer -> eval, ending with the score table.
demo: tiny data
	$(MAKE) --no-print-directory train ARGS=
	$(MAKE) --no-print-directory infer ARGS=
	$(MAKE) --no-print-directory eval SUB=

# Reproducibility bundle of a finished run (default: the tiny demo's, after `make demo`): RUN/audit/ and
# RUN/audit.tar.gz, then its verification (checksums, compliance, greedy re-run of 8 ids).
# The data card declares what the run trained on (AUDIT_DATA: the tiny recipe's training file); the
# contamination guard runs when the MMAR metadata is at MMAR_META.
AUDIT_RUN  ?= runs/tiny
AUDIT_DATA ?= $(SYNTH)/train.jsonl
MMAR_META  ?= ../shared/data/MMAR-meta.jsonl
audit: | setup
	$(PY) -m data_prep card $(RECIPE) --data $(AUDIT_DATA)
	$(PY) -m audit bundle --train-run $(AUDIT_RUN) --infer-output $(AUDIT_RUN)/submission.jsonl --out $(AUDIT_RUN)/audit \
		$(if $(wildcard $(MMAR_META)),--mmar-meta $(MMAR_META))
	$(PY) -m audit verify $(AUDIT_RUN)/audit $(if $(wildcard $(MMAR_META)),--mmar-meta $(MMAR_META))

# The audio tower as an Audio Encoder Challenge (XARES-LLM) encoder folder, and linear probes on it.
ENCODER := runs/tiny/audio_encoder
encoder: tiny data
	$(PY) -m encoder.audio_encoder export --checkpoint $(TINY) --out $(ENCODER)
	$(PY) -m encoder.probe --encoder $(ENCODER) --data $(SYNTH) --out runs/tiny/encoder_probe.json

test: setup
	$(PY) -m pytest

# Every benchmark with its small defaults; tables on stdout, JSON in runs/bench/ (docs/benchmarks.md).
# On a GPU: `make bench DEVICE=cuda` (MoE, training and inference benchmarks run there, in bf16 where it applies).
BENCH_DEVICE = $(if $(DEVICE),--device $(DEVICE))
bench: setup
	@mkdir -p runs/bench
	$(PY) -m bench.moe_bench $(BENCH_DEVICE) --json runs/bench/moe_bench.json
	$(PY) -m bench.train_bench $(BENCH_DEVICE) --json runs/bench/train_bench.json
	$(PY) -m bench.infer_bench $(BENCH_DEVICE) --json runs/bench/infer_bench.json
	$(PY) -m bench.audio_bench --json runs/bench/audio_bench.json
	$(PY) -m bench.eval_bench --json runs/bench/eval_bench.json
	$(PY) -m bench.data_bench --json runs/bench/data_bench.json
	$(PY) -m bench.grpo_bench --json runs/bench/grpo_bench.json

clean:
	rm -rf artifacts runs
