"""Log lines cannot be forged by peer-provided values (the node end to end: test_bad_input)."""

from __future__ import annotations

import json
import logging

from dicom_node.logsetup import JsonFormatter, TextFormatter, escape_controls


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("dicom_node.scp", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_control_characters_are_escaped():
    assert escape_controls("1.2\r\n2026 INFO x: forged") == "1.2\\x0d\\x0a2026 INFO x: forged"
    assert escape_controls("a\x00b\x1b[31m\x7f\x85\u2028") == "a\\x00b\\x1b[31m\\x7f\\x85\\u2028"
    assert escape_controls("Zürich 1.2.3 \\n") == "Zürich 1.2.3 \\n"


def test_text_lines_stay_one_line_and_keep_tracebacks():
    fmt = TextFormatter("%(levelname)s %(name)s: %(message)s")
    record = _record("C-STORE refused from %s: %s", "AE\nX", "uid 1.2\r\nFORGED", exc=True)
    lines = fmt.format(record).splitlines()
    assert (
        lines[0] == "WARNING dicom_node.scp: C-STORE refused from AE\\x0aX: uid 1.2\\x0d\\x0aFORGED"
    )
    assert lines[1].startswith("Traceback") and lines[-1] == "ValueError: boom"
    assert record.getMessage() == "C-STORE refused from AE\nX: uid 1.2\r\nFORGED"  # untouched


def test_json_lines_escape_too():
    line = JsonFormatter().format(_record("value %s", "a\nb"))
    assert "\n" not in line
    assert json.loads(line)["message"] == "value a\\x0ab"
