"""Query/Retrieve SCU (``dicom_node.sources.qr``) against two real Q/R SCPs.

Orthanc 1.10 and DCMTK's ``dcmqrscp`` each hold a real CT series (LIDC-IDRI-0003, 11
slices) and a synthetic study of two series; DCMTK's ``storescp`` is the C-MOVE
destination both know as ``FETCH_SCU``. Each test runs against both peers where they
behave alike: C-FIND at the three levels, C-MOVE of a series and of some of its instances
(the top-up of an incomplete series), C-GET into a folder (the bytes arrive as stored),
and every failure as its one sentence: not found, unknown move destination (0xA801 from
dcmqrscp, 0xC000 from Orthanc), a partial retrieve, unreachable, rejected, refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid
from pynetdicom import evt

from dicom_node.export.push import push_paths
from dicom_node.intake.received import Received, part10_header
from dicom_node.sources import (
    AssociationRejected,
    MoveDestinationUnknown,
    NotFound,
    RetrieveIncomplete,
    ServiceRefused,
    SourceClient,
    SourceSettings,
    SourceUnreachable,
)
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.conftest import require
from tests.peers import DcmQRSCP, Orthanc, StoreSCP, free_port

pytestmark = pytest.mark.cost(8)

#: The AE title the SCU calls with and moves to (the node's, in the node).
NODE_AE = "FETCH_SCU"


class Study:
    """A study's files as Orthanc holds them (``series``) and uncompressed (``plain``, as
    dcmqrscp takes them): its UIDs and each series' files."""

    def __init__(self, series: dict[str, list[Path]], plain: dict[str, list[Path]]) -> None:
        self.series, self.plain = series, plain
        first = pydicom.dcmread(next(iter(series.values()))[0], stop_before_pixels=True)
        self.study_uid = str(first.StudyInstanceUID)

    def sop_uids(self, series_uid: str) -> list[str]:
        return [
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in self.series[series_uid]
        ]

    @property
    def files(self) -> list[Path]:
        return [f for files in self.series.values() for f in files]


@pytest.fixture(scope="module")
def studies(data_dir, tmp_path_factory) -> dict[str, Study]:
    """``real``: LIDC-IDRI-0003 (11 real CT slices); ``synthetic``: two CT series of one
    study, the second RLE Lossless in Orthanc (to see that a C-GET keeps the bytes as
    stored; dcmqrscp takes uncompressed data only)."""
    lidc = sorted(p for p in (data_dir / "ct/lidc-chest/LIDC-IDRI-0003").rglob("*") if p.is_file())
    real = pydicom.dcmread(lidc[0], stop_before_pixels=True)
    out = tmp_path_factory.mktemp("synthetic")
    study_uid = generate_uid()
    series: dict[str, list[Path]] = {}
    plain: dict[str, list[Path]] = {}
    rng = np.random.default_rng(0)
    for number, (slices, compress) in enumerate(((6, False), (4, True)), start=1):
        attrs = SeriesAttributes(study_instance_uid=study_uid, series_number=number)
        hu = rng.integers(-1000, 1000, (slices, 32, 32)).astype(np.int16)
        files = write_ct_series(hu, out / str(number), attrs=attrs)
        plain[attrs.series_instance_uid] = series[attrs.series_instance_uid] = files
        if compress:
            (out / "rle").mkdir()
            series[attrs.series_instance_uid] = []
            for f in files:
                ds = pydicom.dcmread(f)
                ds.compress(RLELossless, generate_instance_uid=False)
                ds.save_as(out / "rle" / f.name, enforce_file_format=True)
                series[attrs.series_instance_uid].append(out / "rle" / f.name)
    lidc_series = {str(real.SeriesInstanceUID): lidc}
    return {"real": Study(lidc_series, lidc_series), "synthetic": Study(series, plain)}


@pytest.fixture(scope="module")
def receiver(tmp_path_factory) -> StoreSCP:
    require("storescp")
    scp = StoreSCP(tmp_path_factory.mktemp("move-destination"), aet=NODE_AE).start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def orthanc_qr(tmp_path_factory, receiver, studies) -> Orthanc:
    require("Orthanc")
    pacs = Orthanc(
        tmp_path_factory.mktemp("orthanc-qr"),
        modalities={"node": [NODE_AE, "127.0.0.1", receiver.port]},
    ).start()
    for study in studies.values():
        # each file in its own transfer syntax (the RLE series stays RLE)
        report = push_paths(study.files, pacs.aet, "127.0.0.1", pacs.dicom_port, progress=False)
        assert report.sent == len(study.files), report.statuses
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory, receiver, studies) -> DcmQRSCP:
    require("dcmqrscp")
    qr = DcmQRSCP(
        tmp_path_factory.mktemp("dcmqrscp"), destinations={NODE_AE: ("127.0.0.1", receiver.port)}
    ).start()
    for study in studies.values():
        qr.store([f for files in study.plain.values() for f in files])
    yield qr
    qr.stop()


@pytest.fixture(params=["orthanc", "dcmqrscp"])
def peer(request) -> tuple[str, SourceSettings]:
    """Each Q/R SCP in turn, as a ``[[sources]]`` entry."""
    if request.param == "orthanc":
        pacs = request.getfixturevalue("orthanc_qr")
        return "orthanc", SourceSettings("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)
    qr = request.getfixturevalue("dcmqrscp")
    return "dcmqrscp", SourceSettings("archive", qr.aet, "127.0.0.1", qr.port)


def to_folder(folder: Path, refuse: set[str] = frozenset()):
    """An ``EVT_C_STORE`` handler writing each instance's bytes as received behind a Part 10
    header (the node's SCP stores them its own way); it refuses the SOP Instance UIDs in
    ``refuse`` with 0xA700. The data set is read where pynetdicom left it, as the node reads
    it: a node started in this process changes where that is."""
    folder.mkdir(parents=True, exist_ok=True)

    def handle(event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in refuse:
            return 0xA700
        data = b"".join(Received.from_event(event).chunks())
        header = part10_header(
            event.context.abstract_syntax, uid, str(event.context.transfer_syntax)
        )
        (folder / f"{uid}.dcm").write_bytes(header + data)
        return 0x0000

    return handle


def test_find_lists_the_study_its_series_and_their_instances(peer, studies):
    name, source = peer
    client = SourceClient(source, NODE_AE)
    real, synthetic = studies["real"], studies["synthetic"]
    match = client.find_study(real.study_uid)
    assert match.study_uid == real.study_uid
    series = client.find_series(synthetic.study_uid)
    assert [s.series_uid for s in series] == list(synthetic.series)  # by Series Number
    assert [s.series_number for s in series] == [1, 2]
    assert {s.modality for s in series} == {"CT"}
    for uid, files in {**real.series, **synthetic.series}.items():
        study_uid = real.study_uid if uid in real.series else synthetic.study_uid
        listed = client.find_instances(study_uid, uid)
        assert sorted(i.sop_instance_uid for i in listed) == sorted(
            (real if uid in real.series else synthetic).sop_uids(uid)
        )
        assert client.count_instances(study_uid, uid) == len(files)
    if name == "orthanc":  # Number of Series Related Instances is optional: Orthanc gives it
        assert client.find_series(real.study_uid)[0].instance_count == 11


def test_find_says_what_is_not_there(peer, studies):
    _, source = peer
    client = SourceClient(source, NODE_AE)
    with pytest.raises(NotFound, match=r"^study 1\.2\.3\.999 is not at source '"):
        client.find_study("1.2.3.999")
    with pytest.raises(NotFound, match=r"^series 1\.2\.3\.998 of study .* is not at source"):
        client.find_series(studies["real"].study_uid, "1.2.3.998")
    assert client.count_instances(studies["real"].study_uid, "1.2.3.998") == 0


def test_move_sends_the_series_to_the_destination(peer, studies, receiver):
    _, source = peer
    real = studies["real"]
    (series_uid,) = real.series
    receiver.clear()
    result = SourceClient(source, NODE_AE).move(NODE_AE, real.study_uid, series_uid)
    assert (result.status, result.completed, result.failed) == (0x0000, 11, 0)
    received = receiver.received()
    assert sorted(received) == sorted(real.sop_uids(series_uid))
    by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in real.series[series_uid]}
    for uid, path in received.items():
        assert pydicom.dcmread(path).PixelData == pydicom.dcmread(by_uid[uid]).PixelData


def test_move_of_some_instances_tops_up_a_series(peer, studies, receiver):
    """The top-up of a series that arrived without a third of its instances: only those."""
    _, source = peer
    synthetic = studies["synthetic"]
    series_uid = next(iter(synthetic.series))
    missing = synthetic.sop_uids(series_uid)[::3]
    receiver.clear()
    result = SourceClient(source, NODE_AE).move(
        NODE_AE, synthetic.study_uid, series_uid, sop_instance_uids=missing
    )
    assert (result.completed, result.failed) == (len(missing), 0)
    assert sorted(receiver.received()) == sorted(missing)


def test_move_to_an_unknown_destination_says_which_ae_title_to_add(peer, studies):
    name, source = peer
    with pytest.raises(MoveDestinationUnknown) as caught:
        SourceClient(source, NODE_AE).move("NOWHERE", studies["real"].study_uid)
    message = str(caught.value)
    assert "add 'NOWHERE' with this node's host and port to its DICOM modalities" in message
    # dcmqrscp says so (0xA801); Orthanc fails with 0xC000 and the study is there
    assert caught.value.result.status == (0xC000 if name == "orthanc" else 0xA801)
    assert ("0xA801 (Move Destination Unknown)" in message) == (name == "dcmqrscp")


def test_move_of_a_study_not_there_is_not_found(peer):
    _, source = peer
    with pytest.raises(NotFound, match=r"^study 1\.2\.3\.997 is not at source"):
        SourceClient(source, NODE_AE).move(NODE_AE, "1.2.3.997")


def test_get_hands_each_instance_over_as_stored(peer, studies, tmp_path):
    """C-GET of the whole synthetic study: both series, the RLE one still RLE (the
    source offers one context per transfer syntax), every pixel byte as sent."""
    name, source = peer
    synthetic = studies["synthetic"]
    released = []  # the node binds its SCP's release handler here
    result = SourceClient(source, NODE_AE).get(
        to_folder(tmp_path),
        synthetic.study_uid,
        handlers=[(evt.EVT_RELEASED, lambda event: released.append(event.assoc))],
    )
    assert len(released) == 1
    assert result.failed == 0
    assert result.received == len(synthetic.files) == 10
    by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in synthetic.files}
    got = {p.stem: p for p in tmp_path.iterdir()}
    assert sorted(got) == sorted(by_uid)
    for uid, path in got.items():
        mine, theirs = pydicom.dcmread(path), pydicom.dcmread(by_uid[uid])
        if name == "orthanc":  # dcmqrscp stores what its storescu sent, decompressed
            assert mine.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
            assert mine.PixelData == theirs.PixelData
        assert np.array_equal(mine.pixel_array, theirs.pixel_array)


def test_partial_get_names_the_failed_count_and_instances(peer, studies, tmp_path):
    name, source = peer
    real = studies["real"]
    (series_uid,) = real.series
    refused = set(real.sop_uids(series_uid)[::4])  # 3 of 11
    with pytest.raises(RetrieveIncomplete) as caught:
        SourceClient(source, NODE_AE).get(
            to_folder(tmp_path, refuse=refused), real.study_uid, series_uid
        )
    result = caught.value.result
    assert (result.failed, result.received) == (3, 8)
    if name == "dcmqrscp":  # Orthanc 1.10 sends its final response without the list
        assert set(result.failed_sop_instance_uids) == refused
    assert f"retrieved series {series_uid} only in part: 3 of 11 instances failed" in str(
        caught.value
    )
    assert len(list(tmp_path.iterdir())) == 8


def test_unreachable_source_says_why():
    port = free_port()
    source = SourceSettings("pacs", "ORTHANC", "127.0.0.1", port, timeout_seconds=5)
    with pytest.raises(SourceUnreachable) as caught:
        SourceClient(source, NODE_AE).find_study("1.2.3")
    assert str(caught.value) == (
        f"source 'pacs' (ORTHANC at 127.0.0.1:{port}) cannot be reached: "
        f"nothing listens on port {port}"
    )


def test_wrong_called_ae_title_is_a_rejection_naming_the_setting(orthanc_qr):
    source = SourceSettings("pacs", "NOT_ORTHANC", "127.0.0.1", orthanc_qr.dicom_port)
    with pytest.raises(AssociationRejected) as caught:
        SourceClient(source, NODE_AE).find_study("1.2.3")
    assert caught.value.reason == 7  # called AE title not recognised
    assert str(caught.value).endswith(
        "check the AE title of source 'pacs' ('NOT_ORTHANC') against the PACS's own"
    )


@pytest.mark.parametrize("op", ["find", "move", "get"])
def test_an_ae_title_the_pacs_does_not_know_is_told_to_be_allowed(
    orthanc_qr, studies, op, tmp_path
):
    """Orthanc accepts the association of an unknown AE title, then hangs up on its
    request (DicomAlwaysAllowFind/Move/Get are false)."""
    source = SourceSettings("pacs", orthanc_qr.aet, "127.0.0.1", orthanc_qr.dicom_port)
    client = SourceClient(source, "STRANGER")
    study = studies["real"].study_uid
    with pytest.raises(ServiceRefused, match="from 'STRANGER': allow that AE title to"):
        if op == "find":
            client.find_study(study)
        elif op == "move":
            client.move("STRANGER", study)
        else:
            client.get(to_folder(tmp_path), study)
