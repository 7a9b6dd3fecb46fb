"""Harmonization Hub: train and use vision models whose feature importance agrees with humans.

TensorFlow is the default backend and part of the base install. For JAX or PyTorch without TensorFlow, build with
`HARMONIZATION_NO_TENSORFLOW=1 pip install ".[jax]"` (or `".[torch]"`): the variable is read here, at build time,
because an extra can only add requirements to a wheel, never take the base install's away.
"""

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
ZOO_ENTRIES_PACKAGE = "harmonization.models.entries"

# What only the TensorFlow parts need (the TFDS builders, tf.data pipelines, `harmonization train`, the quickstart;
# harmonization._backend names them to a user without TensorFlow). Models, presets, saliency, metrics and
# evaluation run on JAX and PyTorch too.
TENSORFLOW_ONLY = frozenset(("tensorflow", "tensorflow-datasets", "importlib_resources", "dill", "tensorboard"))
# torch in [test] is the CPU build this project's machines keep as a local file (2.13.0+cpu, through pip's
# find-links); an unpinned `torch` resolves to PyPI's multi-GB CUDA build.
TEST_TORCH = "torch==2.13.0"


def setup_with_backends(**kwargs) -> None:
    """`setup(**kwargs)`, without the TENSORFLOW_ONLY requirements when HARMONIZATION_NO_TENSORFLOW=1.

    Only "1" leaves TensorFlow out; any other value keeps the default install. The base list stays one literal in
    the call below (tests/test_versions.py reads the pins from it). Requirement names are matched as written
    there (the project name before any version specifier): the build environment has no `packaging` to parse them.
    """
    if os.environ.get("HARMONIZATION_NO_TENSORFLOW") == "1":
        kwargs["install_requires"] = [
            requirement for requirement in kwargs["install_requires"]
            if re.match(r"[A-Za-z0-9._-]+", requirement).group(0) not in TENSORFLOW_ONLY
        ]
    setup(**kwargs)


setup_with_backends(
    name="harmonization-hub",
    version="0.1.0",
    description=(
        "The neural harmonizer for Keras 3 / TensorFlow: align a classifier's "
        "saliency with human feature-importance maps (ClickMe)."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # No generic top-level name (`models`, `tests`): only `harmonization` and `tfds_clickme` are installed.
    # The zoo's entries live in the repository's top-level `models/` folder and install as the package data
    # of `harmonization.models.entries` (harmonization.zoo also finds them there in a source checkout).
    packages=[
        *find_packages(include=["harmonization", "harmonization.*", "tfds_clickme", "tfds_clickme.*"]),
        ZOO_ENTRIES_PACKAGE,
    ],
    package_dir={ZOO_ENTRIES_PACKAGE: "models"},
    include_package_data=True,
    package_data={
        "tfds_clickme": ["**/*.tsv", "**/*.md", "**/*.bib", "**/*.txt", "**/dummy_data/**/*"],
        ZOO_ENTRIES_PACKAGE: ["*.json"],
        "harmonization": ["*.md", "*.txt", "**/*.json", "**/*.txt"],
    },
    install_requires=[
        # What our version-sensitive workarounds support (harmonization/second_order.py, harmonized_model.py:
        # Keras and TensorFlow internals); their errors say "pin keras to 3.12-3.15" / "pin tensorflow to 2.21".
        # tests/test_versions.py fails when these pins, those messages and the installed versions disagree.
        "tensorflow>=2.21,<2.22",
        "keras>=3.12,<3.16",
        "tensorflow-datasets>=4.9,<5",
        # TFDS 4.9 on Python 3.11 imports these but does not declare them.
        "importlib_resources",
        "dill",
        # `harmonization train` writes TensorBoard event files (tf.summary's implementation lives there).
        "tensorboard>=2.21,<2.22",
        "huggingface_hub>=0.24",
        "h5py",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        "jax": ["jax"],
        "torch": ["torch>=2.1"],
        # The cross-backend tests compare TensorFlow, JAX and PyTorch numbers in one environment (child processes).
        "test": ["pytest>=7", "jax", TEST_TORCH],
    },
    entry_points={"console_scripts": ["harmonization=harmonization.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
