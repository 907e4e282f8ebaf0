# Worker image for vitsem flows (CPU). Build: docker build -t vitsem .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VITSEM_HOME=/data/vitsem
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# CPU wheels of the pinned torch keep the image small; the project never needs a newer one.
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY vitsem ./vitsem
COPY flows ./flows
RUN pip install .
RUN useradd --create-home --uid 1000 vitsem && mkdir -p /data/vitsem && chown vitsem /data/vitsem
USER vitsem
ENTRYPOINT ["vitsem"]
CMD ["--help"]
