"""Loading a Triton python-backend ``model.py`` outside Triton, for unit tests of its pure parts."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def loaded_with_stub(path: Path, module_name: str, stub: types.ModuleType) -> Iterator[types.ModuleType]:
    """The module at ``path``, imported with ``stub`` standing in for ``triton_python_backend_utils``
    (which exists only inside a Triton stub process); the stub is removed again afterwards."""
    saved = sys.modules.get(stub.__name__)
    sys.modules[stub.__name__] = stub
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if saved is None:
            sys.modules.pop(stub.__name__, None)
        else:
            sys.modules[stub.__name__] = saved
