"""Triton python-backend model: classifier logits -> probabilities and label names.

Label names, in class-index order, come from the config's ``labels`` parameter (comma separated).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self._labels = np.array(config["parameters"]["labels"]["string_value"].split(","), dtype=object)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float32)
            shifted = logits - logits.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            probabilities = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
            labels = self._labels[probabilities.argmax(axis=1)].reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("LOGITS", logits),
                pb_utils.Tensor("PROBABILITIES", probabilities),
                pb_utils.Tensor("LABEL", np.array([label.encode("utf-8") for label in labels.reshape(-1)],
                                                  dtype=object).reshape(-1, 1)),
            ]))
        return responses
