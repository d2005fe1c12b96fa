"""Finding a dataset's folder from ``root=`` or the ``METASAM_DATA`` environment variable."""

from __future__ import annotations

import os
from pathlib import Path

from metasam.errors import DatasetError


def find_root(root: str | os.PathLike | None, dirname: str, dataset: str) -> list[Path]:
    """Candidate folders for a dataset, most specific first: ``<root>/<dirname>`` then ``<root>``.

    ``root=None`` uses ``$METASAM_DATA``; with neither, the error says how to point at the data.
    """
    if root is None:
        env = os.environ.get("METASAM_DATA")
        if not env:
            raise DatasetError(
                f"{dataset}: no data folder given. Pass --data-root <folder> (root=<folder> in Python) or set the METASAM_DATA "
                f"environment variable to a folder that holds {dirname}/ (see docs/data.md)."
            )
        root = env
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"{dataset}: data folder {base} does not exist; create it, or pass the right --data-root "
                           "(root= in Python)")
    return [base / dirname, base]
