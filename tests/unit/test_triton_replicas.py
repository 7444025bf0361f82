"""Which Triton servers a promotion drives: PIPELINE_TRITON_URL as one, several, or a DNS name."""

import socket

import pytest

from serving.triton_client import TritonReplicas, TritonUnavailable, replica_urls


def _resolver(table: dict[str, list[str]]):
    def resolve(host, port, family, kind):
        assert family == socket.AF_INET and kind == socket.SOCK_STREAM
        if host not in table:
            raise socket.gaierror(f"unknown host {host}")
        return [(family, kind, 6, "", (address, port)) for address in table[host]]
    return resolve


def test_one_or_several_servers():
    assert replica_urls("triton:8000") == ["triton:8000"]
    assert replica_urls(" a:8000, b:8000 ,a:8000,") == ["a:8000", "b:8000"]


def test_dns_name_gives_one_url_per_address():
    resolve = _resolver({"triton-replicas": ["10.0.0.7", "10.0.0.5", "10.0.0.7"]})
    assert replica_urls("dns:triton-replicas:8000", resolve) == ["10.0.0.5:8000", "10.0.0.7:8000"]
    assert replica_urls("dns:localhost:8000") == ["127.0.0.1:8000"]  # the real resolver


@pytest.mark.parametrize("spec, message", [
    ("", "no Triton server"),
    ("dns:triton-replicas", "expected dns:<host>:<port>"),
    ("dns:nowhere:8000", "cannot resolve the Triton replicas of 'dns:nowhere:8000'"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(TritonUnavailable, match=message):
        replica_urls(spec, _resolver({}))


def test_replicas_are_ready_only_when_every_one_is():
    replicas = TritonReplicas(["127.0.0.1:1", "127.0.0.1:2"], timeout_s=1)
    assert replicas.urls == ["127.0.0.1:1", "127.0.0.1:2"]
    assert replicas.is_ready("anything") is False  # nothing listens there
