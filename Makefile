# Two commands for users: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test wheel fuzz bench outcome proto proto-check lint typecheck clean

# torch first, and pinned again beside the project: the nnunet extra pulls
# timm -> torchvision, whose newest release would otherwise drag in a newer
# (CUDA) torch. 2.13.0 is the CPU build on this machine's disk.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]' torch==2.13.0
	@touch $(STAMP)

# DEMO_ARGS=--keep leaves a server and the console running on the demo's store.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) demo/demo.py $(DEMO_ARGS)

test: $(STAMP) proto-check lint
	$(PY) -m pytest -q

# The project's wheel in dist/, for machines without the checkout (README: Put it on
# a training). Offline: the venv's setuptools builds it (in [dev]).
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation --wheel-dir dist .

# The hostile-input fuzz at length (make test runs 1,000 cases per property).
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q \
		-o timeout=3600 tests/integration/test_fuzz.py

# The trainer's and the console's costs first: bench.py's last line is the machine-readable one.
bench: $(STAMP)
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_console.py
	$(PY) benchmarks/bench.py

# Does control help? Real nnU-Net trainings per arm and seed through a policy experiment
# (about 30 min on 2 cores); e.g. OUTCOME_ARGS="--seeds 5 --epochs 40" or "--small".
OUTCOME_ARGS ?=
outcome: $(STAMP)
	$(PY) benchmarks/outcome.py $(OUTCOME_ARGS)

# Regenerate the committed API code from proto/ (pinned grpcio-tools in [dev]).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Itrainer_client/api=proto/trainingcontrol/v1 \
		--python_out=. --grpc_python_out=. --pyi_out=. trainer_client/api/control.proto

# Fails when the committed generated code is out of step with proto/.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && mkdir -p $$tmp/trainer_client/api && \
	$(PY) -m grpc_tools.protoc -Itrainer_client/api=proto/trainingcontrol/v1 \
		--python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp trainer_client/api/control.proto && \
	for f in control_pb2.py control_pb2.pyi control_pb2_grpc.py; do \
		diff -q $$tmp/trainer_client/api/$$f trainer_client/api/$$f >/dev/null || \
		{ echo "proto-check: trainer_client/api/$$f is out of step with proto/; run 'make proto'"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "proto-check: generated code matches proto/"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy control_server trainer_client

clean:
	rm -rf $(VENV) *.egg-info build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
