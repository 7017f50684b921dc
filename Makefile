# make demo   -- set up, then run the whole workflow on the embedded default through the Airflow DAG
# make test   -- set up, then run the test suite
# make workflow  -- the same workflow without Airflow (python -m stages workflow)
# make stack     -- Airflow (standalone) + MLflow UI on localhost, the DAG loaded, to trigger from the browser
# make bench-paper -- the paper's table in miniature (bench/paper_table.py --preset cpu, <= 30 min), results in bench/results/
# make bench-speed -- ours vs TRL on identical work (bench/speed_vs_trl.py), results in bench/results/
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
	$(VENV)/bin/pip install -q -e '.[airflow,dev,bench]' -c constraints.txt
	touch $@

$(AIRFLOW_HOME)/.ready: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(VENV)/bin/airflow db migrate >/dev/null
	$(VENV)/bin/airflow pools set gpu 1 "GPU slots: one stage at a time per GPU" >/dev/null
	touch $@

.PHONY: install demo workflow test stack bench-paper bench-speed clean
install: $(VENV)/.installed

demo: $(AIRFLOW_HOME)/.ready
	$(VENV)/bin/airflow dags test sparse_to_dense -c '{"preset": "tiny", "artifact_root": "$(CURDIR)/$(ROOT)"}'
	@cat $(ROOT)/summary.md
	@printf '\nArtifacts: $(ROOT)/<stage>/ (checkpoints, rollouts, metrics, manifest.json)\n'
	@echo "Table:     $(ROOT)/summary.md"
	@echo "MLflow:    $(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)  ->  http://127.0.0.1:5000"
	@echo "Airflow:   make stack  ->  http://127.0.0.1:8080 (DAG sparse_to_dense)"

workflow: $(VENV)/.installed
	$(VENV)/bin/python -m stages workflow --config tiny --root $(ROOT)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check stages dags tests bench
	$(VENV)/bin/python -m pytest -q

stack: $(AIRFLOW_HOME)/.ready
	infra/local-stack.sh

bench-paper: $(VENV)/.installed
	$(VENV)/bin/python bench/paper_table.py --preset cpu --out bench/results

bench-speed: $(VENV)/.installed
	$(VENV)/bin/python bench/speed_vs_trl.py --out bench/results

bench-mechanism: $(VENV)/.installed
	$(VENV)/bin/python bench/paper_table.py --preset cpu --digits 3 4 5 --seeds 0 1 2 --out bench/results

bench-determinism: $(VENV)/.installed
	$(VENV)/bin/python bench/determinism.py --out bench/results

clean:
	rm -rf runs mlruns mlflow.db mlartifacts .airflow
