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
PYTEST_ARGS ?=

.PHONY: setup run test ui clean-runs

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[video,test,cluster]"
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/fibo-run $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Browse every run of this checkout's default store (http://127.0.0.1:5000)
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean-runs:
	rm -rf logs mlflow.db mlartifacts
