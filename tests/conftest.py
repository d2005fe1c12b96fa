"""Keep decoded-dataset caches of the whole test session out of the user's ~/.cache."""

import os

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
