"""Small helpers over tritonclient's HTTP client: readiness, load/unload, inference; and the set of
Triton replicas that serve one shared model repository."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import numpy as np

from serving.errors import ServingError
from serving.replicas import ReplicasUnresolved, resolve_replicas


class TritonUnavailable(ServingError):
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

    def loaded_versions(self, model: str) -> list[int]:
        """The versions Triton holds in memory for ``model`` (its metadata), even when the repository no
        longer has their folders (the repository index lists what is on disk); [] when none."""
        try:
            metadata = self._client.get_model_metadata(model)
        except Exception:  # noqa: BLE001 - not loaded, or Triton down
            return []
        return sorted(int(version) for version in metadata.get("versions", []) if str(version).isdigit())

    def classify(self, model: str, texts: list[str], version: int | None = None,
                 extra_outputs: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Send raw texts to a classifier ensemble; returns LABEL (str), PROBABILITIES and LOGITS arrays,
        and the ``extra_outputs`` asked for (e.g. ``("EMBEDDING",)``) as they come."""
        text = self._http.InferInput("TEXT", [len(texts), 1], "BYTES")
        text.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1))
        names = ("LABEL", "PROBABILITIES", "LOGITS") + tuple(extra_outputs)
        outputs = [self._http.InferRequestedOutput(name) for name in names]
        result = self._client.infer(model, [text], model_version="" if version is None else str(version),
                                    outputs=outputs)
        labels = [item.decode("utf-8") if isinstance(item, bytes) else str(item)
                  for item in result.as_numpy("LABEL").reshape(-1)]
        return {"LABEL": np.array(labels)} | {name: result.as_numpy(name) for name in names[1:]}

    def labels(self, model: str, texts: list[str]) -> list[str]:
        """The label served for each text, one text per request (as candidates are evaluated)."""
        return [str(self.classify(model, [text])["LABEL"][0]) for text in texts]

    def close(self) -> None:
        self._client.close()


def replica_urls(spec: str, resolve: Callable = socket.getaddrinfo) -> list[str]:
    """The Triton servers ``PIPELINE_TRITON_URL`` names, as ``host:port`` URLs.

    ``host:port`` is one server; several are joined by commas. ``dns:host:port`` is every IPv4
    address ``host`` resolves to when asked, e.g. a Kubernetes headless Service, which lists one
    address per ready Triton pod, so a promotion reaches the pods an autoscaler added.
    """
    try:
        return resolve_replicas(spec, "Triton", resolve)
    except ReplicasUnresolved as error:
        raise TritonUnavailable(str(error)) from error


class TritonReplicas:
    """Every Triton server serving one shared model repository, driven together.

    ``load`` and ``unload`` go to each replica in turn; ``is_ready`` holds only when every replica
    reports the model (version) ready. Inference goes to one replica at a time (``clients``), so
    each can be checked on its own.
    """

    def __init__(self, urls: list[str], timeout_s: float = 30.0) -> None:
        self.clients = [TritonClient(url, timeout_s) for url in urls]

    @classmethod
    def from_spec(cls, spec: str) -> TritonReplicas:
        return cls(replica_urls(spec))

    @property
    def urls(self) -> list[str]:
        return [client.url for client in self.clients]

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        for client in self.clients:
            client.wait_ready(timeout_s)

    def load(self, model: str) -> None:
        for client in self.clients:
            try:
                client.load(model)
            except TritonUnavailable as error:
                raise TritonUnavailable(f"{error} (replica {client.url})") from error

    def unload(self, model: str) -> None:
        for client in self.clients:
            client.unload(model)

    def is_ready(self, model: str, version: int | None = None) -> bool:
        return all(client.is_ready(model, version) for client in self.clients)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def load_and_wait(client: TritonReplicas | TritonClient, models: tuple[str, ...], version: int,
                  timeout_s: float = 120.0) -> None:
    """Load (or reload) ``models`` and wait until version N of each is ready (on every replica)."""
    for model in models:
        client.load(model)
    wait_until_ready(client, models, version, timeout_s)


def wait_until_ready(client: TritonReplicas | TritonClient, models: tuple[str, ...], version: int | None = None,
                     timeout_s: float = 120.0) -> None:
    """Wait until ``models`` (version ``version``, or any) are ready (on every replica); raise
    TritonUnavailable naming the late servers otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(client.is_ready(model, version) for model in models):
            return
        time.sleep(0.25)
    clients = client.clients if isinstance(client, TritonReplicas) else [client]
    late = [each.url for each in clients if not all(each.is_ready(model, version) for model in models)]
    which = "" if version is None else f" version {version}"
    raise TritonUnavailable(f"Triton did not report {', '.join(models)}{which} ready within "
                            f"{timeout_s:.0f}s (on {', '.join(late)})")
