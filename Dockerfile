# The vitsem image: CLI, flows, Prefect worker and MLflow server of the compose stack.
#   CPU (default):  docker build -t vitsem:0.1.0 .
#   CUDA variant:   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                     -t vitsem:0.1.0-cuda .
# The CUDA wheels carry their own CUDA runtime: the host needs only the NVIDIA driver and the
# NVIDIA container toolkit (compose's `worker-gpu` reserves one GPU).
FROM python:3.11.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VITSEM_HOME=/data/vitsem
# g++: torch.compile builds the fused attention-statistics kernel (vitsem/method/row_stats.py)
# with it; without one the analysis warns once and runs the slower eager path.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The pinned torch from the chosen index (CPU wheels keep the default image small).
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url ${TORCH_INDEX}
# Everything else from the lock, every file checked against its hash (scripts/lock.sh
# regenerates it; it pins the servers too: prefect, mlflow[auth] for MLflow's basic auth).
COPY infra/requirements.lock infra/requirements.lock
RUN pip install --require-hashes --no-deps -r infra/requirements.lock
COPY pyproject.toml README.md prefect.yaml ./
COPY vitsem ./vitsem
COPY flows ./flows
RUN pip install --no-deps . && pip check
RUN useradd --create-home --uid 1000 vitsem && mkdir -p /data/vitsem \
    && chown vitsem /data/vitsem /app
USER vitsem
ENTRYPOINT ["vitsem"]
CMD ["--help"]
