"""Pure parts of the ONNX Runtime stand-in backend (serving/triton_backends/onnxruntime/model.py):
which requests run together and how outputs are cut back per request."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from tests.python_backend import loaded_with_stub

BACKEND = Path(__file__).resolve().parents[2] / "serving" / "triton_backends" / "onnxruntime" / "model.py"


@pytest.fixture(scope="module")
def backend():
    # The module imports Triton's python-backend utilities, which exist only inside a Triton stub;
    # the functions tested here do not use them.
    placeholder = types.ModuleType("triton_python_backend_utils")
    with loaded_with_stub(BACKEND, "onnxruntime_standin", placeholder) as module:
        yield module


def _shapes(*rows_and_lengths):
    return [((rows, length), (rows, length)) for rows, length in rows_and_lengths]


def test_equal_shapes_run_together_in_arrival_order(backend):
    shapes = _shapes((1, 16), (1, 16), (2, 16), (1, 16))
    assert backend.batch_groups(shapes, max_batch_size=8) == [[0, 1, 2, 3]]


def test_different_lengths_run_apart(backend):
    shapes = _shapes((1, 16), (1, 9), (1, 16), (1, 9), (1, 30))
    assert backend.batch_groups(shapes, max_batch_size=8) == [[0, 2], [1, 3], [4]]


def test_a_group_never_exceeds_max_batch_size_rows(backend):
    shapes = _shapes((3, 16), (3, 16), (3, 16), (1, 16))
    assert backend.batch_groups(shapes, max_batch_size=6) == [[0, 1], [2, 3]]


def test_without_a_batch_dimension_every_request_runs_alone(backend):
    shapes = _shapes((1, 16), (1, 16))
    assert backend.batch_groups(shapes, max_batch_size=0) == [[0], [1]]


def test_outputs_are_cut_back_per_request(backend):
    merged = np.arange(12).reshape(6, 2)
    pieces = backend.split_rows(merged, [1, 3, 2])
    assert [piece.tolist() for piece in pieces] == [[[0, 1]], [[2, 3], [4, 5], [6, 7]], [[8, 9], [10, 11]]]
