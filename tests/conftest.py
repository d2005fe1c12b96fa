"""Keep decoded-dataset caches of the whole test session out of the user's ~/.cache; real small file systems
for the full-disk and read-only tests."""

import os
import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    previous = os.environ.get("METASAM_CACHE")
    os.environ["METASAM_CACHE"] = str(tmp_path_factory.mktemp("metasam-cache-session"))
    yield
    if previous is None:
        os.environ.pop("METASAM_CACHE", None)
    else:
        os.environ["METASAM_CACHE"] = previous


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, read_only=False)`` → a new folder with a tmpfs of ``size`` (e.g. "3m") mounted on it, unmounted
    after the test. Skips the test, with the reason, where this process may not mount (it needs root)."""
    mounted = []

    def mount(size: str = "3m", read_only: bool = False):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a {size} tmpfs here ({done.stderr.strip() or 'mount failed'}); the test needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)
