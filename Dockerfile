# GPU image: NVIDIA's PyTorch container brings CUDA torch, Transformer Engine and Apex, which
# megatron_wmss imports lazily. The project goes on top with the README's own install command
# (`make venv`: a venv that sees the container's packages, so its torch is kept), and the build
# fails unless the image's Python and torch satisfy the megatron-core release we pin.
#   docker build -t megatron-wmss .
#   docker run --gpus all --rm megatron-wmss                 # prints `wmss env`
# On Slurm with pyxis: WMSS_CONTAINER_IMAGE=<registry>/megatron-wmss:TAG sbatch launch/wmss.slurm
#
# 25.12: Python 3.12, PyTorch 2.10.0a0, CUDA 13.1 (NVIDIA's release notes). megatron-core
# 0.16.1 needs Python >= 3.10 and torch >= 2.6; setup.py needs torch >= 2.4.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# bubblewrap: the code sandbox of `wmss eval` (HumanEval, MBPP) refuses to run without it.
# Not pinned: the base image's Ubuntu release fixes the version, and security updates apply.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/megatron_wmss
COPY Makefile setup.py pyproject.toml README.md ./
COPY megatron_wmss ./megatron_wmss
# Before the install: setup.py maps the lm-eval task YAMLs in as package data.
COPY evaluation ./evaluation
RUN make venv PYTHON=python3
ENV PATH=/opt/megatron_wmss/.venv/bin:${PATH}
# The image's interpreter and torch against what the installed megatron-core declares.
RUN python -m megatron_wmss.platform.image_check --require-cuda-torch
COPY launch ./launch
COPY examples ./examples
COPY tests ./tests

CMD ["wmss", "env"]
