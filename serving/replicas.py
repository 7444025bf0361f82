"""Replicas of one service named in one setting: ``host:port`` entries joined by commas, or
``dns:host:port`` for every IPv4 address a name resolves to (a Kubernetes headless Service, or
Docker's DNS for a scaled compose service: one address per ready replica)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from serving.errors import ServingError

DNS_PREFIX = "dns:"


class ReplicasUnresolved(ServingError):
    """A replica setting is malformed, names nothing, or its DNS name does not resolve."""


def resolve_replicas(spec: str, service: str, resolve: Callable = socket.getaddrinfo) -> list[str]:
    """The entries of ``spec`` in order, each once, a ``dns:host:port`` entry expanded to
    ``address:port`` for every address ``host`` resolves to when asked (sorted).

    Args:
        spec: the setting's value.
        service: what the replicas are, for the messages ("Triton", "gateway").
        resolve: ``socket.getaddrinfo`` or a stand-in with its signature.
    """
    entries: list[str] = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if not entry.startswith(DNS_PREFIX):
            entries.append(entry)
            continue
        host, _, port = entry[len(DNS_PREFIX):].rpartition(":")
        if not host or not port.isdigit():
            raise ReplicasUnresolved(f"{entry!r}: expected dns:<host>:<port>")
        try:
            records = resolve(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except OSError as error:
            raise ReplicasUnresolved(f"cannot resolve the {service} replicas of {entry!r}: {error}") from error
        entries.extend(f"{address}:{port}" for address in sorted({record[4][0] for record in records}))
    if not entries:
        raise ReplicasUnresolved(f"no {service} server in {spec!r}")
    return list(dict.fromkeys(entries))
