"""The replacements of pynetdicom internals: on the version they were read in, and working.

Outside the version they were checked against, the node switches its pynetdicom tuning off
and only ingest speed would tell; so these tests fail, never skip, when another pynetdicom
is installed, saying what to re-read.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import pynetdicom
from packaging.requirements import Requirement
from packaging.version import Version
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from dicom_node.common import associations
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
    "DULServiceProvider._run_loop_delay, send_pdu, kill_dul and the module's time.sleep; "
    "DIMSEServiceProvider.send_msg and the C-STORE-RSP it encodes; "
    "Association._run_reactor's 1 ms sleep; "
    "the request's _dataset_file and _dataset_path; "
    "DIMSEMessage._data_set_file; DIMSEServiceProvider.msg_queue and get_msg, which "
    "dicom_node/common/associations.py overrides) and what dicom_node/intake/connections.py replaces "
    "(AssociationSocket.recv), run bench/ingest.py, then update TESTED_PYNETDICOM (dicom_node/common/associations.py) and the "
    "pynetdicom pin in pyproject.toml"
)


def test_installed_pynetdicom_is_the_version_the_tuning_was_checked_against():
    assert pynetdicom.__version__ == associations.TESTED_PYNETDICOM, (
        f"pynetdicom {pynetdicom.__version__} is installed, the tuning was checked against "
        f"{associations.TESTED_PYNETDICOM}: {RECHECK}"
    )
    assert associations.TUNES_INTERNALS, f"the tuning is switched off here: {RECHECK}"


def test_the_pin_admits_the_tested_version_and_no_release_that_switches_the_tuning_off():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "pynetdicom"]
    tested = Version(associations.TESTED_PYNETDICOM)
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
    # the DUL loop sleeps through its module's ``time``; it is told of work by these
    assert "time" in DULServiceProvider.run_reactor.__code__.co_names, RECHECK
    for method in ("send_pdu", "kill_dul"):
        assert callable(getattr(DULServiceProvider, method, None)), RECHECK
    assert callable(getattr(DIMSEServiceProvider, "send_msg", None)), RECHECK
    # the acceptor reactor's loop sleeps 1 ms through its module's ``time``
    from pynetdicom.association import Association

    loop = Association._run_reactor.__code__
    assert "time" in loop.co_names and tuning._REACTOR_LOOP_SLEEP in loop.co_consts, RECHECK
    # the reactor polls the DIMSE queue, which RequestorDIMSE peeks at
    assert "get_msg" in loop.co_names and "_is_paused" in loop.co_names, RECHECK
    assert hasattr(DIMSEServiceProvider(None).msg_queue, "mutex"), RECHECK  # type: ignore[arg-type]
    assert tuning.IDLE_LOOP_DELAY == 0.001  # pynetdicom's own, restored when idle


def _scp(tmp_path) -> tuple[StorageSCP, int]:
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
    return node, port


def _ct_association(port: int):
    """An established association proposing CT Image Storage to the SCP at ``port``."""
    from pydicom.uid import CTImageStorage

    from tests.peers import associate

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    assoc, rejected = associate(ae, port, ae_title="DICOM_NODE")
    assert assoc.is_established, rejected
    return assoc


def test_a_dul_sleeps_until_the_peer_sends_or_a_response_is_queued(tmp_path, monkeypatch):
    """The served association's DUL waits on its socket and on a wake-up that queuing a
    PDU gives: with its sleep stretched to 30 s, requests are still read and answered
    within the requestor's 2 s DIMSE timeout (no polling brings them), and it releases."""
    assert tuning.WAKES_DUL, f"a Linux eventfd is expected here: {RECHECK}"
    monkeypatch.setattr(tuning, "WAKEABLE_LOOP_DELAY", 30.0)
    node, port = _scp(tmp_path)
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        assert assoc.is_established
        [served] = node.ae.active_associations
        assert isinstance(served.dimse, tuning.PromptDIMSE)
        assert served.dul._run_loop_delay == 30.0
        for _ in range(5):
            assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert assoc.is_released
        served.join(10)
        assert not served.is_alive()
    finally:
        node.stop()


def test_where_the_dul_cannot_be_woken_it_polls_fast_while_busy_and_idles_at_1_ms(
    tmp_path, monkeypatch
):
    """Without an eventfd the DUL loops fast while requests arrive and is back at
    pynetdicom's 1 ms once the association is idle."""
    monkeypatch.setattr(tuning, "WAKES_DUL", False)
    monkeypatch.setattr(tuning, "BUSY_PERIOD", 0.2)
    node, port = _scp(tmp_path)
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


def test_a_store_response_is_encoded_as_pynetdicom_encodes_it():
    """The hand-encoded C-STORE-RSP command set is pynetdicom's, byte for byte."""
    from pydicom.uid import CTImageStorage
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    for status, instance, message_id in (
        (0x0000, "1.2.3.4", 1),
        (0xA700, "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345", 65535),
        (0xC001, "1.2.3.45", 7),
    ):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = CTImageStorage
        rsp.AffectedSOPInstanceUID = instance
        rsp.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        expected = encode(message.command_set, True, True)
        assert tuning.store_response_command(CTImageStorage, message_id, status, instance) == (
            expected
        )


def test_a_response_pdu_is_encoded_as_pynetdicom_encodes_it():
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    command = tuning.store_response_command("1.2.840.10008.5.1.4.1.1.2", 3, 0, "1.2.3.4")
    for context_id in (1, 7, 255):
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context_id, b"\x03" + command))
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assert tuning.response_pdu(context_id, command) == pdu.encode()


def test_a_response_is_sent_from_the_association_thread_on_plain_tcp_only():
    """On a plain connection the response goes straight out; a TLS connection is left to
    the DUL thread, the only one that may use OpenSSL's connection."""
    import queue
    import socket
    import ssl
    import types

    def provider(sock) -> tuning.PromptDIMSE:
        dul = types.SimpleNamespace(
            socket=types.SimpleNamespace(socket=sock, event_queue=queue.Queue()),
            state_machine=types.SimpleNamespace(current_state="Sta6"),
            to_provider_queue=queue.Queue(),
        )
        assoc = types.SimpleNamespace(dul=dul, get_handlers=lambda event: [], dimse_timeout=30)
        return tuning.PromptDIMSE(assoc)  # type: ignore[arg-type]

    command = tuning.store_response_command("1.2.840.10008.5.1.4.1.1.2", 1, 0, "1.2.3")
    ours, peer = socket.socketpair()
    with ours, peer:
        assert provider(ours)._send_now(1, command)
        assert peer.recv(4096) == tuning.response_pdu(1, command)
    context = ssl.create_default_context()
    with context.wrap_socket(
        socket.socket(), server_hostname="pacs", do_handshake_on_connect=False
    ) as tls:
        assert not provider(tls)._send_now(1, command)


def test_store_responses_go_on_the_socket_from_the_association_thread(tmp_path, monkeypatch):
    """A plain C-STORE response is sent by the association's own thread, not queued for
    the DUL's; the peer has every answer, and the association releases as usual."""
    from pydicom import dcmread
    from pynetdicom.pdu_primitives import P_DATA

    from dicom_node_testing.synthetic import write_ct_series

    queued: list[bool] = []  # per P-DATA queued for a DUL: whether the node's
    own_send_pdu = DULServiceProvider.send_pdu

    def send_pdu(dul: DULServiceProvider, primitive) -> None:
        if isinstance(primitive, P_DATA):
            queued.append(not dul.assoc.is_requestor)
        own_send_pdu(dul, primitive)

    monkeypatch.setattr(DULServiceProvider, "send_pdu", send_pdu)
    hu = np.zeros((4, 16, 16), np.int16)
    paths = write_ct_series(hu, tmp_path / "ct", spacing=(2.0, 1.0, 1.0))
    node, port = _scp(tmp_path)
    try:
        assoc = _ct_association(port)
        statuses = [assoc.send_c_store(dcmread(p)).Status for p in paths]
        assoc.release()
        assert assoc.is_released
    finally:
        node.stop()
    assert statuses == [0] * len(paths)
    assert queued.count(False) >= len(paths)  # the requests, queued by the peer's DUL
    assert queued.count(True) == 0  # no response went through the node's DUL queue


def test_a_stopped_scp_gives_pynetdicom_its_own_file_handling_back(tmp_path):
    """Receiving to files is process-wide: while one SCP of the process still runs the
    replacements stay, and once the last stops nothing writes under its spool."""
    own = (
        dimse_messages.NamedTemporaryFile,
        dimse_messages.create_file_meta,
        dimse_messages.write_file_meta_info,
        _config.STORE_RECV_CHUNKED_DATASET,
    )
    first, _ = _scp(tmp_path / "a")
    second, _ = _scp(tmp_path / "b")
    assert dimse_messages.NamedTemporaryFile is tuning._incoming_file
    first.stop()
    assert dimse_messages.NamedTemporaryFile is tuning._incoming_file
    assert _config.STORE_RECV_CHUNKED_DATASET
    second.stop()
    restored = (
        dimse_messages.NamedTemporaryFile,
        dimse_messages.create_file_meta,
        dimse_messages.write_file_meta_info,
        _config.STORE_RECV_CHUNKED_DATASET,
    )
    assert restored == own
    if own[0] is not tuning._incoming_file:  # no SCP of an earlier test still runs
        assert restored[0] is tempfile.NamedTemporaryFile
        assert tuning._incoming_dir is None


def test_an_association_alone_writes_its_data_sets_through_and_not_beside_others(
    tmp_path, monkeypatch
):
    """A C-STORE of the only association is written to the disk as it arrives and renamed
    into the spool; while another association is held, it is written once it is in."""
    from pydicom import dcmread

    from dicom_node.intake.spool import Spool as SpoolClass
    from dicom_node_testing.synthetic import write_ct_series

    how: list[str] = []
    own_adopt, own_write = SpoolClass.adopt, SpoolClass.write

    def adopt(spool, received, path):
        how.append("renamed")
        return own_adopt(spool, received, path)

    def write(spool, path, *chunks):
        how.append("written")
        return own_write(spool, path, *chunks)

    monkeypatch.setattr(SpoolClass, "adopt", adopt)
    monkeypatch.setattr(SpoolClass, "write", write)
    hu = np.zeros((4, 64, 64), np.int16)
    paths = write_ct_series(hu, tmp_path / "ct", spacing=(2.0, 1.0, 1.0))
    node, port = _scp(tmp_path)
    try:
        assoc = _ct_association(port)
        alone = [assoc.send_c_store(dcmread(p)).Status for p in paths[:2]]
        other = _ct_association(port)
        beside = [assoc.send_c_store(dcmread(p)).Status for p in paths[2:]]
        other.release()
        assoc.release()
    finally:
        node.stop()
    assert alone + beside == [0] * 4
    assert how == ["renamed", "renamed", "written", "written"]
    assert list(node.spool.incoming.iterdir()) == []
    assert len(node.spool.all_files()) == 4
