"""Requests spread across several Triton servers, and survive one of them stopping.

Two real servers (nvidia-pytriton's tritonserver, the ``echo`` model only, so that they start
in seconds) on free loopback ports, behind one :class:`TritonBackend`. What each server
served is read from Triton's own statistics API, not from the client.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from dicom_node.inference import InferenceError
from dicom_node.inference.triton.client import TritonBackend
from dicom_node.inference.triton.server import TritonServer
from tests.peers import free_port, triton_server

pytestmark = [pytest.mark.slow, pytest.mark.cost(12)]

VOLUME = np.arange(6 * 16 * 16, dtype=np.int16).reshape(6, 16, 16)


def served(server: TritonServer) -> int:
    """Successful ``echo`` requests the server counted since it started."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics("echo", as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def served_after(server: TritonServer, at_least: int) -> int:
    """:func:`served`, once it reaches ``at_least`` or 10 s passed.

    Triton records a request in its statistics just after sending the response, so a count
    read right after the last response may miss that one request.
    """
    deadline = time.monotonic() + 10
    while (count := served(server)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def settled(server: TritonServer) -> int:
    """:func:`served` once no request is in flight: the count stopped changing for 0.3 s."""
    count = served(server)
    while True:
        time.sleep(0.3)
        if (again := served(server)) == count:
            return count
        count = again


def echo(backend: TritonBackend) -> None:
    out = backend.infer({"INPUT": VOLUME}, ["OUTPUT"])["OUTPUT"]
    np.testing.assert_array_equal(out, VOLUME)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pair = [
        triton_server(tmp_path_factory.mktemp(f"triton{i}"), ["echo"], fixed_ports=True)
        for i in range(2)
    ]
    errors: list[BaseException] = []

    def start(srv: TritonServer) -> None:
        try:
            srv.start()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield pair
    finally:
        for srv in pair:
            srv.stop()


def test_requests_spread_fail_over_and_come_back(servers):
    a, b = servers
    backend = TritonBackend(
        [a.grpc_url, b.grpc_url],
        model="echo",
        transport="grpc",
        down_seconds=0.2,
        max_down_seconds=1.0,
    )
    try:
        # Both up: strict round-robin.
        before = settled(a), settled(b)
        for _ in range(8):
            echo(backend)
        counts = served_after(a, before[0] + 4), served_after(b, before[1] + 4)
        assert (counts[0] - before[0], counts[1] - before[1]) == (4, 4)

        # b is stopped while requests keep coming: none of them fails.
        failures: list[BaseException] = []
        done = threading.Event()
        count = [0]

        def client_loop() -> None:
            while not done.is_set():
                try:
                    echo(backend)
                except BaseException as exc:
                    failures.append(exc)
                count[0] += 1

        worker = threading.Thread(target=client_loop)
        worker.start()
        try:
            while count[0] < 5 and worker.is_alive():
                time.sleep(0.01)
            b.stop()
            at_stop = count[0]
            while count[0] < at_stop + 20 and worker.is_alive():
                time.sleep(0.01)
        finally:
            done.set()
            worker.join(timeout=60)
        assert not failures, failures[:3]
        assert count[0] >= at_stop + 20
        assert b.grpc_url not in backend.healthy_urls()

        # Every later request is served by a.
        a_before = settled(a)
        for _ in range(6):
            echo(backend)
        assert served_after(a, a_before + 6) - a_before == 6

        # b comes back (same ports, counters start at 0): once its health check passes it
        # is in the rotation again, and round-robin shares requests evenly once more.
        b.start()
        deadline = time.monotonic() + 60
        while served(b) == 0 and time.monotonic() < deadline:
            echo(backend)
            time.sleep(0.1)
        assert served(b) > 0, "the restarted server never received a request"
        assert backend.healthy_urls() == [a.grpc_url, b.grpc_url]
        before = settled(a), settled(b)
        for _ in range(6):
            echo(backend)
        counts = served_after(a, before[0] + 3), served_after(b, before[1] + 3)
        assert (counts[0] - before[0], counts[1] - before[1]) == (3, 3)
    finally:
        backend.close()


def test_failed_server_is_set_aside_not_retried_on_every_request(servers, caplog):
    a = servers[0]
    if not a.is_alive():
        a.start()
    dead = f"127.0.0.1:{free_port()}"
    backend = TritonBackend(
        [dead, a.grpc_url],
        model="echo",
        transport="grpc",
        down_seconds=600.0,
        max_down_seconds=600.0,
    )
    try:
        caplog.set_level(logging.DEBUG, logger="dicom_node.inference.triton.client")
        before = settled(a)
        for _ in range(5):
            echo(backend)
        assert served_after(a, before + 5) - before == 5
        attempts = [r for r in caplog.records if r.getMessage().startswith(f"Triton at {dead}")]
        assert len(attempts) == 1, [r.getMessage() for r in attempts]
        assert "cannot be reached" in attempts[0].getMessage()
        assert backend.healthy_urls() == [a.grpc_url]
        assert backend.ready()
        # reconnect() says the server is back: it is tried again at once.
        backend.reconnect(dead)
        assert backend.healthy_urls() == [dead, a.grpc_url]
    finally:
        backend.close()


def test_set_aside_servers_are_still_tried_when_no_other_can_serve(servers):
    a = servers[0]
    if not a.is_alive():
        a.start()
    backend = TritonBackend(
        [a.grpc_url], model="echo", transport="grpc", down_seconds=600.0, max_down_seconds=600.0
    )
    try:
        with pytest.raises(InferenceError, match="'no_such_model' is not ready"):
            backend.infer({"INPUT": VOLUME}, ["OUTPUT"], model="no_such_model")
        assert backend.healthy_urls() == []
        # Set aside for ten minutes, but the only server: it is tried, and trusted again.
        echo(backend)
        assert backend.healthy_urls() == [a.grpc_url]
    finally:
        backend.close()


def test_ready_is_false_when_no_server_answers():
    backend = TritonBackend([f"127.0.0.1:{free_port()}"], model="echo", health_timeout=2.0)
    try:
        assert not backend.ready()
    finally:
        backend.close()


def test_duplicate_urls_and_bad_pauses():
    backend = TritonBackend(["127.0.0.1:1", "grpc://127.0.0.1:1"])
    assert backend.urls == ["127.0.0.1:1"]
    backend.close()
    with pytest.raises(ValueError, match="down_seconds"):
        TritonBackend(["127.0.0.1:1"], down_seconds=10.0, max_down_seconds=1.0)
