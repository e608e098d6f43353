# The trainer image: torchrun (through dvgt.train.launch), the dvgt package and its stage configs on a CUDA PyTorch base.
#   docker build -t REGISTRY/dvgt/trainer:0.1.0 .
# The chart runs `python -m dvgt.train.launch --nproc-per-node=N -m dvgt.train --config=...` (torchrun with honest exit codes) in /workspace as user 1000.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dvgt
COPY pyproject.toml README.md ./
COPY charts ./charts
COPY dvgt ./dvgt
# torch comes with the base image (it satisfies the package's torch requirement).
RUN pip install --no-cache-dir . \
    && groupadd --gid 1000 dvgt \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin dvgt \
    && mkdir /workspace \
    && chown dvgt:dvgt /workspace

USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "dvgt.train.launch"]
CMD ["--nproc-per-node=1", "-m", "dvgt.train", "--config=train/dvgt1/demo.yaml"]
