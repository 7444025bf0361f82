"""A Python-based Triton backend named ``onnxruntime`` that runs ONNX models with ONNX Runtime.

Why it exists: the pip-bundled ``tritonserver`` (nvidia-pytriton) ships only the python
backend. Placing this file at ``<backends>/onnxruntime/model.py`` lets standard model
repositories (``platform: "onnxruntime_onnx"``, ``<version>/model.onnx``) load unchanged
on a CPU development machine. The official Triton container uses its real C++ ONNX
Runtime backend for the same repository; nothing in the repository refers to this file.

It honours the model configuration fields a repository written by this project uses:
inputs/outputs (names, data types), ``default_model_filename`` and the ``intra_op_thread_count`` /
``inter_op_thread_count`` parameters of the real backend. Like the real backend, it runs the
requests Triton's dynamic batcher hands over in one call as one batch: requests whose inputs have
the same shapes are concatenated along the batch dimension, run once, and the outputs split back
(Triton enforces ``max_batch_size``; the batcher groups only requests of equal shapes).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def batch_groups(shapes: list[tuple[tuple[int, ...], ...]], max_batch_size: int) -> list[list[int]]:
    """Indexes of the requests to run together: equal input shapes (batch dimension aside), in
    arrival order, at most ``max_batch_size`` rows per group; ``max_batch_size`` 0 (the model has no
    batch dimension): every request alone."""
    if max_batch_size <= 0:
        return [[index] for index in range(len(shapes))]
    ordered: list[list[int]] = []
    open_groups: dict[tuple, tuple[list[int], int]] = {}  # input shapes -> (the group filling up, its rows)
    for index, request_shapes in enumerate(shapes):
        key = tuple(shape[1:] for shape in request_shapes)
        rows = request_shapes[0][0]
        group, group_rows = open_groups.get(key, (None, 0))
        if group is not None and group_rows + rows <= max_batch_size:
            group.append(index)
        else:
            group, group_rows = [index], 0
            ordered.append(group)
        open_groups[key] = (group, group_rows + rows)
    return ordered


def split_rows(array: np.ndarray, rows: list[int]) -> list[np.ndarray]:
    """``array`` cut along its first dimension into consecutive pieces of ``rows`` rows."""
    return np.split(array, np.cumsum(rows)[:-1], axis=0)


def _thread_setting(config: dict, key: str) -> int:
    """Read an integer backend parameter (``parameters { key: ... value { string_value } }``)."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", "0")
    return int(value)


class TritonPythonModel:
    """Serve one ONNX model version with an ONNX Runtime CPU session."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(
                f"Could not find ONNX model file {path}: write <version>/{filename} into the repository"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = _thread_setting(config, "intra_op_thread_count")
        options.inter_op_num_threads = _thread_setting(config, "inter_op_thread_count")
        # Idle intra-op threads sleep instead of spinning: the server, the other models' stubs and
        # the clients share the cores (on 2 cores `make bench-triton` served 184 texts/s with this vs
        # 138-152 without; in-process ONNX Runtime keeps the default).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._max_batch_size = int(config.get("max_batch_size", 0))
        self._input_names = [item["name"] for item in config["input"]]
        self._output_names = [item["name"] for item in config["output"]]
        self._output_dtypes = {
            item["name"]: pb_utils.triton_string_to_numpy(item["data_type"]) for item in config["output"]
        }
        session_inputs = {item.name for item in self._session.get_inputs()}
        missing = [name for name in self._input_names if name not in session_inputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"config.pbtxt names inputs {missing} that {filename} does not have; "
                f"the model's inputs are {sorted(session_inputs)}"
            )

    def execute(self, requests: list) -> list:
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self._input_names}
            for request in requests
        ]
        shapes = [tuple(feed[name].shape for name in self._input_names) for feed in feeds]
        responses: list = [None] * len(requests)
        for group in batch_groups(shapes, self._max_batch_size):
            if len(group) == 1:
                responses[group[0]] = self._run_one(feeds[group[0]])
                continue
            merged = {name: np.concatenate([feeds[index][name] for index in group]) for name in self._input_names}
            try:
                outputs = self._session.run(self._output_names, merged)
            except Exception:  # noqa: BLE001 - run them one by one, so only the bad request fails
                for index in group:
                    responses[index] = self._run_one(feeds[index])
                continue
            rows = [shapes[index][0][0] for index in group]
            pieces = [split_rows(value, rows) for value in outputs]
            for position, index in enumerate(group):
                responses[index] = self._response([piece[position] for piece in pieces])
        return responses

    def _run_one(self, feed: dict):
        try:
            outputs = self._session.run(self._output_names, feed)
        except Exception as error:  # noqa: BLE001 - every runtime error becomes a per-request error
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        return self._response(outputs)

    def _response(self, outputs: list):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=self._output_dtypes[name]))
            for name, value in zip(self._output_names, outputs)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self._session = None
