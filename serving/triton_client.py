"""Small helpers over tritonclient's HTTP client: readiness, load/unload, inference."""

from __future__ import annotations

import time

import numpy as np

from tasks.errors import PipelineError


class TritonUnavailable(PipelineError):
    """Triton did not answer, or the model is not ready."""


class TritonClient:
    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        import tritonclient.http as httpclient

        self._http = httpclient
        self.url = url
        self._client = httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._client.is_server_ready():
                    return
            except Exception:  # noqa: BLE001 - any connection failure means "not yet"
                pass
            time.sleep(0.5)
        raise TritonUnavailable(f"Triton at {self.url} not ready after {timeout_s:.0f}s: is the stack up (`make up`)?")

    def load(self, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self._client.load_model(model)
        except InferenceServerException as error:
            raise TritonUnavailable(f"Triton could not load {model}: {error.message()}") from error

    def unload(self, model: str) -> None:
        self._client.unload_model(model)

    def is_ready(self, model: str, version: int | None = None) -> bool:
        try:
            return bool(self._client.is_model_ready(model, "" if version is None else str(version)))
        except Exception:  # noqa: BLE001
            return False

    def ready_versions(self, model: str) -> list[int]:
        index = self._client.get_model_repository_index()
        return sorted(int(item["version"]) for item in index
                      if item.get("name") == model and item.get("state") == "READY" and item.get("version"))

    def classify(self, model: str, texts: list[str], version: int | None = None) -> dict[str, np.ndarray]:
        """Send raw texts to a classifier ensemble; returns LABEL (str), PROBABILITIES and LOGITS arrays."""
        text = self._http.InferInput("TEXT", [len(texts), 1], "BYTES")
        text.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1))
        outputs = [self._http.InferRequestedOutput(name) for name in ("LABEL", "PROBABILITIES", "LOGITS")]
        result = self._client.infer(model, [text], model_version="" if version is None else str(version),
                                    outputs=outputs)
        labels = [item.decode("utf-8") if isinstance(item, bytes) else str(item)
                  for item in result.as_numpy("LABEL").reshape(-1)]
        return {"LABEL": np.array(labels), "PROBABILITIES": result.as_numpy("PROBABILITIES"),
                "LOGITS": result.as_numpy("LOGITS")}

    def labels(self, model: str, texts: list[str]) -> list[str]:
        """The label served for each text, one text per request (as candidates are evaluated)."""
        return [str(self.classify(model, [text])["LABEL"][0]) for text in texts]

    def close(self) -> None:
        self._client.close()
