# The trainer image: torchrun, the dvgt package and its stage configs on CUDA, with the torch the project
# tests (2.13.0, CUDA build). Non-root (UID 10001); the chart runs it with a read-only root filesystem.
#   make image            (or: docker build -t REGISTRY/dvgt/trainer:0.1.0 .)
# The chart runs `python -m dvgt.train.launch --nproc-per-node=N -m dvgt.train --config=...` (torchrun whose exit
# code tells a restart policy the truth: 143 on SIGTERM) in /workspace.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, from the CUDA index, pinned: the layer survives changes to the package.
RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

WORKDIR /opt/dvgt
COPY pyproject.toml README.md ./
COPY charts ./charts
COPY dvgt ./dvgt
RUN pip install . \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), 'the package replaced torch'" \
    && groupadd --gid 10001 dvgt \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin dvgt \
    && mkdir /workspace \
    && chown dvgt:dvgt /workspace

USER 10001:10001
ENV HOME=/tmp
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "dvgt.train.launch"]
CMD ["--nproc-per-node=1", "-m", "dvgt.train", "--config=train/dvgt1/demo.yaml"]
