"""Bad input at the association: contexts the node does not take, PDUs out of order, wrong
AE titles, requests without contexts. Each refused as PS3.8 says."""

from __future__ import annotations

import io
import struct
import time

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    CTImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from tests.peers import associate, storescu
from tests.peers import testdata as shared_data
from tests.system.bad_input.crafting import (
    PRIVATE_SOP_CLASS,
    UNKNOWN_SYNTAX,
    association,
    comment_of,
    connect,
    ct_slice_ds,
    drain,
    echo,
    encoded,
    pdu_bytes,
    pdu_kind,
    scu_ae,
    spooled_uids,
    status_of,
)

pytestmark = [
    pytest.mark.cost(4),
    pytest.mark.filterwarnings(
        "ignore:Invalid value for VR UI",
        "ignore:The value length",
        "ignore:Expected explicit VR",
        "ignore:Invalid value for VR DS",
    ),
]

# -- negotiation --------------------------------------------------------------------------
NEGOTIATION_CASES = [
    ("unknown transfer syntax", CTImageStorage, UNKNOWN_SYNTAX, 0x04),
    ("MR Image Storage", MRImageStorage, ExplicitVRLittleEndian, 0x03),
    ("Comprehensive SR Storage", ComprehensiveSRStorage, ExplicitVRLittleEndian, 0x03),
    ("Segmentation Storage", SegmentationStorage, ExplicitVRLittleEndian, 0x03),
    ("a private SOP class", PRIVATE_SOP_CLASS, ExplicitVRLittleEndian, 0x03),
    ("RT Structure Set Storage", RTStructureSetStorage, ExplicitVRLittleEndian, 0x03),
    ("Secondary Capture Image Storage", SecondaryCaptureImageStorage, ImplicitVRLittleEndian, 0x03),
    ("CT Image Storage in a private syntax only", CTImageStorage, PRIVATE_SOP_CLASS, 0x04),
]
_CONTEXT_RESULT = {0x03: "abstract syntax not supported", 0x04: "transfer syntax not supported"}


@pytest.mark.parametrize(
    ("case", "abstract", "syntax", "result"),
    NEGOTIATION_CASES,
    ids=[c[0] for c in NEGOTIATION_CASES],
)
def test_refused_in_negotiation(node, ledger, served, case, abstract, syntax, result):
    assoc = scu_ae((abstract, [syntax])).associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established  # Verification is accepted; the storage context is not
    observed = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assoc.release()
    ledger.check(
        f"{case}: refused in negotiation",
        _CONTEXT_RESULT[result],
        _CONTEXT_RESULT.get(observed.get(abstract), "accepted"),
    )


def test_real_seg_from_dcmtk_is_refused_in_negotiation(node, ledger, served):
    seg = shared_data() / "seg" / "dcmqi" / "liver.dcm"
    r = storescu(node.port, seg, "DICOM_NODE", "STORESCU", "-R")  # propose the file's class
    observed = r.stderr.strip() if r.returncode else "sent"
    ledger.check(
        "real SEG file from DCMTK storescu", "F: No Acceptable Presentation Contexts", observed
    )
    assert str(pydicom.dcmread(seg).SOPInstanceUID) not in spooled_uids(node)


def _sr() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    return ds


def _mr() -> Dataset:
    ds = ct_slice_ds()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    return ds


@pytest.mark.parametrize(("case", "build"), [("MR", _mr), ("SR", _sr)])
def test_non_ct_fails_with_0122_when_negotiated(fail_node, ledger, case, build):
    ds = build()
    with association(fail_node.port, ds.SOPClassUID) as assoc:
        rsp = assoc.send_c_store(ds)
    ledger.check(
        f"{case} with unsupported_sop_class='fail'",
        f"0x0122 SOP class {ds.SOPClassUID} is not a CT image",
        f"{status_of(rsp, ledger, ds.SOPInstanceUID)} {comment_of(rsp)}",
    )
    assert echo(fail_node.port)


def test_real_seg_from_dcmtk_fails_with_0122(fail_node, ledger):
    r = storescu(
        fail_node.port,
        shared_data() / "seg" / "dcmqi" / "liver.dcm",
        "DICOM_NODE",
        "STORESCU",
        "-R",
        "-v",
    )
    response = [line for line in r.stderr.splitlines() if "Received Store Response" in line]
    ledger.check(
        "real SEG file from DCMTK with unsupported_sop_class='fail'",
        "I: Received Store Response (Refused: SOPClassNotSupported)",
        response[0] if response else r.stderr[-300:],
    )
    assert fail_node.jobs() == []
    assert echo(fail_node.port)


# -- association-level abuse --------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "pdu"),
    [
        ("P-DATA-TF before any association", pdu_bytes(0x04, struct.pack(">LBB", 4, 1, 3) + b"ab")),
        ("A-RELEASE-RQ before any association", pdu_bytes(0x05, bytes(4))),
        ("A-ASSOCIATE-AC sent to the acceptor", pdu_bytes(0x02, bytes(68))),
    ],
)
def test_pdu_out_of_order_is_aborted(node, ledger, served, case, pdu):
    with connect(node) as s:
        s.sendall(pdu)
        answer = drain(s)
    ledger.check(case, "A-ABORT", pdu_kind(answer))


def test_wrong_called_ae_title_is_rejected(node, ledger, served):
    assoc, rejection = associate(
        scu_ae((CTImageStorage, [ExplicitVRLittleEndian])), node.port, ae_title="NOT_THE_NODE"
    )
    if assoc.is_established:
        assoc.release()
    observed = "established" if rejection is None else f"rejected {rejection}"
    # (result, source, reason): rejected permanent, by the service user, called AE title
    ledger.check("A-ASSOCIATE-RQ to another called AE title", "rejected (1, 1, 7)", observed)


def test_association_request_without_presentation_contexts(node, ledger, served):
    with connect(node) as s:
        s.sendall(_associate_rq_without_contexts())
        answer = drain(s, timeout=10)
    ledger.check("A-ASSOCIATE-RQ without presentation contexts", "A-ASSOCIATE-RJ", pdu_kind(answer))


def _associate_rq_without_contexts() -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) with an application context and user information
    (maximum length) and no presentation context item."""
    app = b"1.2.840.10008.3.1.1.1"
    app_item = struct.pack(">BBH", 0x10, 0, len(app)) + app
    max_len = struct.pack(">BBHL", 0x51, 0, 4, 16384)
    user = struct.pack(">BBH", 0x50, 0, len(max_len)) + max_len
    body = (
        struct.pack(">HH", 1, 0)
        + b"DICOM_NODE".ljust(16)
        + b"BAD_INPUT".ljust(16)
        + bytes(32)
        + app_item
        + user
    )
    return pdu_bytes(0x01, body)


def test_c_store_on_a_context_never_negotiated(node, ledger, served):
    ds = ct_slice_ds()
    with association(node.port) as assoc:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = io.BytesIO(encoded(ds))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        for pdata in msg.encode_msg(201, 16384):  # an odd ID no context was given
            assoc.dul.send_pdu(pdata)
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        observed = "aborted by the node" if assoc.is_aborted else "still open"
    ledger.check("C-STORE on a presentation context never negotiated", "aborted", observed)
    assert str(ds.SOPInstanceUID) not in spooled_uids(node)
