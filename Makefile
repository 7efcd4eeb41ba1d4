# fibo: two commands for a fresh machine (see README.md)
#   make run   -> set up .venv if needed, then train the default Fibottention ViT on digits
#   make test  -> set up .venv if needed, then run the test suite
# Extra fibo-run arguments: make run ARGS="attention=dense seed=1"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fibo-installed
# torch first and pinned: on the reference machines pip takes these wheels from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# two pytest-xdist workers (tests/conftest.py gives each one OpenMP thread): about 1.5x faster on 2 cores
PYTEST_ARGS ?= -n 2

.PHONY: setup run test ui compare analyze clean-runs

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[video,robot,test,cluster]"
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/fibo-run $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Browse the runs on http://127.0.0.1:$(UI_PORT): this checkout's default store, else UI_STORE=<store URI>
# (or $$MLFLOW_TRACKING_URI when set). A tracking server (http://...) serves its own UI: open its URL.
# MLflow's GenAI job runner (8 processes) stays off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
UI_PORT ?= 5000
UI_STORE ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
UI_ARGS ?= --workers 1
ui: setup
	@case "$(UI_STORE)" in http://*|https://*) echo "$(UI_STORE) is an MLflow tracking server: its UI is that URL"; exit 0;; esac; \
	echo "MLflow UI on http://127.0.0.1:$(UI_PORT) for $(UI_STORE) (Ctrl-C stops it)"; \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
	exec $(VENV)/bin/mlflow ui --backend-store-uri "$(UI_STORE)" --host 127.0.0.1 --port $(UI_PORT) $(UI_ARGS)

# Compare runs (one line per configuration, mean ± std over seeds, plot): make compare ARGS="-e fibo"
compare: setup
	$(VENV)/bin/fibo-compare $(ARGS)

# Analyse a trained run (head CKA, attention statistics, head ablation, corruptions, pictures) into
# its MLflow run: make analyze ARGS="ckpt_path=logs/runs/<run>/checkpoints/last.ckpt"
analyze: setup
	$(VENV)/bin/fibo-analyze $(ARGS)

clean-runs:
	rm -rf logs mlflow.db mlartifacts
