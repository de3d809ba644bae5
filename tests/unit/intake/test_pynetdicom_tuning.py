"""The replacements of pynetdicom internals: on the version they were read in, and working.

Outside the version they were checked against, the node switches its pynetdicom tuning off
and only ingest speed would tell; so these tests fail, never skip, when another pynetdicom
is installed, saying what to re-read.
"""

from __future__ import annotations

import sys
import time

import pynetdicom
from packaging.requirements import Requirement
from packaging.version import Version
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from dicom_node.config import settings_from_dict
from dicom_node.intake import pynetdicom_tuning as tuning
from dicom_node.intake.scp import StorageSCP
from dicom_node.intake.spool import Spool
from dicom_node.state import JobDatabase
from tests.peers import ROOT, free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


RECHECK = (
    "re-read, in the new pynetdicom, what dicom_node/intake/pynetdicom_tuning.py replaces "
    "(dimse_messages.NamedTemporaryFile, create_file_meta and write_file_meta_info; "
    "DIMSEServiceProvider.get_msg, receive_primitive and msg_queue; "
    "DULServiceProvider._run_loop_delay; the request's _dataset_file and _dataset_path; "
    "DIMSEMessage._data_set_file) and what dicom_node/intake/connections.py replaces "
    "(AssociationSocket.recv), run bench/ingest.py, then update TESTED_PYNETDICOM and the "
    "pynetdicom pin in pyproject.toml"
)


def test_installed_pynetdicom_is_the_version_the_tuning_was_checked_against():
    assert pynetdicom.__version__ == tuning.TESTED_PYNETDICOM, (
        f"pynetdicom {pynetdicom.__version__} is installed, the tuning was checked against "
        f"{tuning.TESTED_PYNETDICOM}: {RECHECK}"
    )
    assert tuning.TUNES_INTERNALS, f"the tuning is switched off here: {RECHECK}"


def test_the_pin_admits_the_tested_version_and_no_release_that_switches_the_tuning_off():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "pynetdicom"]
    tested = Version(tuning.TESTED_PYNETDICOM)
    assert tested in pin.specifier, f"pyproject.toml's {pin} excludes the tested {tested}"
    # the tuning applies to the tested series only: outside it the node would only be slower
    series = f"{tested.major}.{tested.minor}"
    for untested in (f"{tested.major}.{tested.minor + 1}", f"{tested.major + 1}.0", "2.1"):
        assert Version(untested) not in pin.specifier, f"{pin} admits {untested}, not {series}"


def test_the_internals_replaced_are_where_they_were():
    """What the tuning assigns or overrides exists, so an assignment is not a silent no-op."""
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        assert hasattr(dimse_messages, name), f"dimse_messages.{name} is gone: {RECHECK}"
    assert isinstance(_config.STORE_RECV_CHUNKED_DATASET, bool)
    for method in ("get_msg", "receive_primitive"):
        assert callable(getattr(DIMSEServiceProvider, method, None)), RECHECK
    assert callable(getattr(AssociationSocket, "recv", None)), RECHECK
    assert "_run_loop_delay" in DULServiceProvider.__init__.__code__.co_names, RECHECK
    assert tuning.IDLE_LOOP_DELAY == 0.001  # pynetdicom's own, restored when idle


def test_associations_answer_promptly_and_idle_at_pynetdicom_pace(tmp_path, monkeypatch):
    """While requests arrive the DUL loops fast; an idle association is back at 1 ms."""
    monkeypatch.setattr(tuning, "BUSY_PERIOD", 0.2)
    port = free_port()
    settings = settings_from_dict(
        {
            "node": {
                "ae_title": "DICOM_NODE",
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(tmp_path),
            },
            "limits": {"min_free_disk_mb": 1},
        }
    )
    node = StorageSCP(settings, Spool(tmp_path / "spool"), JobDatabase(tmp_path / "j.sqlite"))
    node.start()
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        [served] = node.ae.active_associations
        assert isinstance(served.dimse, tuning.PromptDIMSE)
        assert served.dul._run_loop_delay == tuning.BUSY_LOOP_DELAY
        time.sleep(0.2 + 2 * tuning.REACTOR_WAIT + 0.1)
        assert served.dul._run_loop_delay == tuning.IDLE_LOOP_DELAY
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert assoc.is_released
    finally:
        node.stop()
