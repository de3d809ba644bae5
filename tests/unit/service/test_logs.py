"""Log lines cannot be forged by peer-provided values (the node end to end: test_bad_input),
and pynetdicom's transport layer writes one line per bad connection."""

from __future__ import annotations

import json
import logging
import sys
import threading

from dicom_node.intake.connections import ConnectionRefused
from dicom_node.intake.transport_log import TransportLogFilter, quiet_transport_log
from dicom_node.service.logs import JsonFormatter, TextFormatter, escape_controls


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord(
        "dicom_node.intake.scp", logging.WARNING, __file__, 1, msg, args, exc_info
    )


def test_control_characters_are_escaped():
    assert escape_controls("1.2\r\n2026 INFO x: forged") == "1.2\\x0d\\x0a2026 INFO x: forged"
    assert escape_controls("a\x00b\x1b[31m\x7f\x85\u2028") == "a\\x00b\\x1b[31m\\x7f\\x85\\u2028"
    assert escape_controls("Zürich 1.2.3 \\n") == "Zürich 1.2.3 \\n"


def test_text_lines_stay_one_line_and_keep_tracebacks():
    fmt = TextFormatter("%(levelname)s %(name)s: %(message)s")
    record = _record("C-STORE refused from %s: %s", "AE\nX", "uid 1.2\r\nFORGED", exc=True)
    lines = fmt.format(record).splitlines()
    assert (
        lines[0]
        == "WARNING dicom_node.intake.scp: C-STORE refused from AE\\x0aX: uid 1.2\\x0d\\x0aFORGED"
    )
    assert lines[1].startswith("Traceback") and lines[-1] == "ValueError: boom"
    assert record.getMessage() == "C-STORE refused from AE\nX: uid 1.2\r\nFORGED"  # untouched


def test_json_lines_escape_too():
    line = JsonFormatter().format(_record("value %s", "a\nb"))
    assert "\n" not in line
    assert json.loads(line)["message"] == "value a\\x0ab"


def _on_new_thread(call):
    """``call()``'s result, run on a thread of its own (as each connection's DUL is)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    thread.join()
    return result[0]


def _exc_record(exc: BaseException, msg: str = "") -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, msg, (), exc_info)


def test_transport_log_keeps_one_unknown_pdu_line_per_connection():
    garbage = logging.LogRecord(
        "pynetdicom.dul",
        logging.ERROR,
        __file__,
        1,
        "Unknown PDU type received '0x%02x'",
        (9,),
        None,
    )
    flt = TransportLogFilter()
    kept = _on_new_thread(lambda: [flt.filter(garbage) for _ in range(3)])
    assert kept == [True, False, False]
    assert _on_new_thread(lambda: flt.filter(garbage))  # another connection: its own line


def test_transport_log_drops_tracebacks_but_keeps_the_message():
    flt = TransportLogFilter()
    record = _exc_record(ConnectionResetError("peer reset"), "Connection failed")
    assert flt.filter(record)
    assert (record.getMessage(), record.exc_info, record.exc_text) == (
        "Connection failed",
        None,
        None,
    )
    record = _exc_record(TimeoutError())  # LOGGER.exception(exc) of an exception without text
    assert flt.filter(record)
    assert record.getMessage() == "TimeoutError" and record.exc_info is None


def test_transport_log_adds_nothing_to_a_read_the_guard_refused():
    flt = TransportLogFilter()

    def refused_then_logged() -> list[bool]:
        refused = ConnectionRefused("message deadline passed")  # marks this thread
        closed = logging.LogRecord(
            "pynetdicom.dul",
            logging.ERROR,
            __file__,
            1,
            "Connection closed before the entire PDU was received",
            (),
            None,
        )
        other = logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, "other", (), None)
        return [flt.filter(_exc_record(refused)), flt.filter(closed), flt.filter(other)]

    assert _on_new_thread(refused_then_logged) == [False, False, True]
    # on a thread no guard refused, the same lines are kept
    closed = logging.LogRecord(
        "pynetdicom.dul",
        logging.ERROR,
        __file__,
        1,
        "Connection closed before the entire PDU was received",
        (),
        None,
    )
    assert _on_new_thread(lambda: flt.filter(closed))


def test_the_transport_filter_is_installed_once():
    dul_log = logging.getLogger("pynetdicom.dul")
    quiet_transport_log()
    quiet_transport_log()
    assert sum(isinstance(f, TransportLogFilter) for f in dul_log.filters) == 1
