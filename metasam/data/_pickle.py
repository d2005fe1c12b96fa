"""Reading a pickle of numpy arrays and plain containers without running code from the file.

``pickle.load`` calls whatever function a file names, so a crafted ``.pkl`` runs code the moment it is
read. :func:`load_arrays` admits only the names numpy's own array pickles use (ndarray, dtype, scalar and
their reconstructors) besides dicts, lists, tuples, strings and numbers, which pickle builds without
calling anything; any other name stops the load before it is called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from metasam.errors import DatasetError

ADMITTED = frozenset({
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 writes bytes
    ("collections", "OrderedDict"),
})
"""(module, name) pairs a pickle of numpy arrays may refer to."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ADMITTED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    pass


def load_arrays(path: Path, dataset: str) -> Any:
    """The object pickled in ``path``, built only from numpy arrays and plain containers; raises
    :class:`DatasetError` naming the file (and what it refers to) for anything else or a corrupt file."""
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f).load()
    except _Refused as exc:
        raise DatasetError(
            f"{dataset}: {path} refers to {exc}, which no pickle of numpy arrays needs; it was not loaded, since "
            "unpickling it could run code. Re-create the file from a source you trust, or use the CSV or folder "
            "format (see docs/data.md)") from exc
    except Exception as exc:  # pickle raises many types for a damaged file
        raise DatasetError(f"{dataset}: cannot unpickle {path} ({type(exc).__name__}: {exc}); is it damaged?") from exc
