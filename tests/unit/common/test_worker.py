"""The node's background loop: woken at once, polling otherwise, going on after an error."""

from __future__ import annotations

import threading
import time

from dicom_node.common.worker import Worker


def test_a_wake_runs_a_round_at_once_and_more_is_taken_without_waiting():
    rounds: list[float] = []
    more = [3]
    done = threading.Event()

    def step() -> bool:
        rounds.append(time.monotonic())
        if len(rounds) > 1 and more[0]:
            more[0] -= 1
            return True
        if not more[0]:
            done.set()
        return False

    worker = Worker("test-worker", step, interval=30.0, what="test")
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while not rounds and time.monotonic() < deadline:
            time.sleep(0.01)
        woken = time.monotonic()
        worker.wake()
        assert done.wait(5), "a wake must not wait for the 30 s poll"
        # the woken round said "more" three times: four rounds back to back
        assert len(rounds) == 5 and rounds[-1] - woken < 5
    finally:
        worker.stop(5)


def test_a_round_that_raises_is_logged_and_the_loop_goes_on(caplog):
    calls = []
    again = threading.Event()

    def step() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("one bad item")
        again.set()
        return False

    worker = Worker("test-worker", step, interval=0.05, what="exporter")
    worker.start()
    try:
        assert again.wait(5)
    finally:
        worker.stop(5)
    assert "exporter error" in caplog.text and "one bad item" in caplog.text


def test_stop_ends_the_thread():
    worker = Worker("test-worker", lambda: False, interval=30.0, what="test")
    worker.start()
    worker.stop(5)
    assert not any(t.name == "test-worker" for t in threading.enumerate())
