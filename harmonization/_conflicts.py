"""Refuse to run on top of the published research package, which installs the same `harmonization/` folder.

serre-lab/Harmonization 0.0.9 is distributed on PyPI as `Harmonization`; harmonization-hub installs the same
import name. pip lets both be installed, each overwriting the other's files, and uninstalling either one
deletes files the other needs. Nothing good can come of that state, so `import harmonization` says so and
how to leave it. Only package metadata is read here (no TensorFlow), so the message comes first.
"""

from __future__ import annotations

from importlib import metadata

#: The published package's distribution name on PyPI (serre-lab/Harmonization setup.py: name="Harmonization").
PUBLISHED_DISTRIBUTION = "Harmonization"


class ConflictingPackageError(ImportError):
    """The published `Harmonization` distribution is installed in the same environment as harmonization-hub."""


def check_no_published_package() -> None:
    """Raise `ConflictingPackageError` when the published `Harmonization` distribution is installed."""
    try:
        published = metadata.distribution(PUBLISHED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return
    where = getattr(published, "_path", None)
    raise ConflictingPackageError(
        f"The published research package {PUBLISHED_DISTRIBUTION} {published.version} "
        f"(serre-lab/Harmonization{f', at {where}' if where else ''}) is installed in this environment next to "
        "harmonization-hub. Both install the `harmonization` package, so its files are a mix of the two. "
        "harmonization-hub runs code written for 0.0.9 unchanged (harmonization.models, .evaluation, .training, "
        "and .common keep its names), so remove the old one and reinstall ours:\n"
        f"    python -m pip uninstall -y {PUBLISHED_DISTRIBUTION}\n"
        "    python -m pip install --force-reinstall --no-deps harmonization-hub   "
        "(or `.` instead of harmonization-hub in a clone)"
    )
