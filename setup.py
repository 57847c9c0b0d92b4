"""RIN in JAX: fused kernels (Pallas TPU, Triton GPU) and the full diffusion model."""
from setuptools import find_packages, setup

setup(
    name="rin-jax",
    version="0.1.0",
    description="Recurrent Interface Networks in JAX with fused read/write kernels",
    python_requires=">=3.12",
    packages=find_packages(include=["kernels", "kernels.*", "rin", "rin.*", "bench", "bench.*"]),
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "tqdm",
        "pillow",
        "scikit-learn",   # ships the embedded digits data set
        "grain>=0.2.10",
        "tensorboardX",
        "matplotlib",
        "scipy",
        "threadpoolctl",
        # jax.export (de)serialisation: the FVD evaluator loads its feature network as a
        # serialised jax.export artefact.
        "flatbuffers",
    ],
    extras_require={
        # torch only feeds Triton's CPU interpreter in the tests (jax-triton needs a GPU).
        # jax's CUDA plugin and libtpu (the deviceless GPU and TPU compile rungs) are not
        # here: scripts/setup.sh installs them into .venv/xla_gpu_plugin and .venv/libtpu_site,
        # on PYTHONPATH of the static tools' compile processes only, so CPU-only jax processes
        # print neither the plugin's cuInit failure nor libtpu's host warnings.
        "test": ["pytest", "pytest-xdist", "hypothesis", "triton", "jax-triton", "torch",
                 "pytorch-fid"],
        "gpu": ["jax-triton", "triton"],
        "bench": ["rin-pytorch", "torchvision", "tokamax"],
        # The TPU compiler for deviceless compiles (bench.tpu_static, bench.tpu_aot_check); flatbuffers
        # serializes the kernels bench.tpu_static profiles one by one.
        "tpu-static": ["libtpu", "flatbuffers"],
        # XLA's GPU compiler for deviceless compiles (bench.gpu_static), with its CUDA libraries.
        "gpu-static": ["jax-cuda13-plugin[with-cuda]", "jax-cuda13-pjrt"],
    },
)
