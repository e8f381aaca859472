# GPU image: NVIDIA's PyTorch container brings CUDA torch, Transformer Engine and Apex, which
# megatron_wmss imports lazily. The project adds megatron-core (the series CI tests) and its own
# dependencies on top, without replacing the container's torch.
#   docker build -t megatron-wmss .
#   docker run --gpus all --rm megatron-wmss wmss env
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megatron_wmss
COPY setup.py pyproject.toml README.md ./
COPY megatron_wmss ./megatron_wmss
# Before the install: setup.py maps the lm-eval task YAMLs in as package data.
COPY evaluation ./evaluation
# The container's torch already satisfies torch>=2.4, so pip leaves it alone.
RUN python -m pip install --no-cache-dir -e ".[eval]"
COPY launch ./launch
COPY examples ./examples

CMD ["wmss", "env"]
