"""The host-sync audit names the innermost frame of the package and leaves other warnings alone."""

from __future__ import annotations

import traceback
import warnings
from collections import Counter

import pytest

from benchmarks.host_syncs import call_site, host_sync_sites


def _waits_for_the_device() -> None:  # stands in for a `.item()` under sync debug mode
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)


def test_sync_warnings_are_counted_by_the_packages_innermost_frame() -> None:
    sites: Counter[str] = Counter()
    with host_sync_sites(sites, package="benchmarks"):  # this file lives under tests/benchmarks/
        for _ in range(3):
            _waits_for_the_device()
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                      "synchronizing operations", UserWarning, stacklevel=1)  # torch's notice: not a wait
        with pytest.warns(DeprecationWarning, match="unrelated"):
            warnings.warn("unrelated", DeprecationWarning, stacklevel=1)
    [(site, count)] = sites.items()
    assert count == 3
    assert site.startswith("benchmarks/test_host_syncs.py:") and site.endswith(" _waits_for_the_device")


def test_call_site_without_a_package_frame_is_the_innermost() -> None:
    frames = traceback.extract_stack()
    assert call_site(frames, package="no-such-package").endswith(
        " test_call_site_without_a_package_frame_is_the_innermost")
