"""The version stamped on what vitcc writes: reports, latency tables, `vitcc --version`."""
from __future__ import annotations

__version__ = "0.2.0"


def installed_version() -> str:
    """The installed vitcc's version (what pip knows), or why there is none."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("vitcc")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"
