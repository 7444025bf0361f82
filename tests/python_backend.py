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


TOKENIZER_MODEL = Path(__file__).resolve().parents[1] / "serving" / "triton_models" / "tokenizer" / "model.py"


class StubTensor:
    """``pb_utils.Tensor``: a named array."""

    def __init__(self, name: str, array) -> None:
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class StubResponse:
    """``pb_utils.InferenceResponse``: its output tensors by name, or its error."""

    def __init__(self, output_tensors=None, error=None) -> None:
        self.outputs = {tensor.name: tensor.array for tensor in output_tensors or []}
        self.error = error


class StubModelException(Exception):
    """``pb_utils.TritonModelException``."""


@contextmanager
def loaded_tokenizer_model(module_name: str) -> Iterator[types.ModuleType]:
    """serving/triton_models/tokenizer/model.py with a stand-in for ``triton_python_backend_utils``: a
    request is a dict of input arrays by name, a response a ``StubResponse``."""
    stub = types.ModuleType("triton_python_backend_utils")
    stub.Tensor, stub.InferenceResponse, stub.TritonModelException = StubTensor, StubResponse, StubModelException
    stub.TritonError = str
    stub.get_input_tensor_by_name = lambda request, name: StubTensor(name, request[name])
    with loaded_with_stub(TOKENIZER_MODEL, module_name, stub) as module:
        yield module
