"""Where a received data set is held while it arrives, and the header its spool file gets."""

from __future__ import annotations

import io
import os
import stat

from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import create_file_meta

from dicom_node.intake import pynetdicom_tuning
from dicom_node.intake.received import SPILL_ABOVE, IncomingDataSet, Received, part10_header


def test_a_data_set_stays_in_memory_until_it_grows_past_the_spill_size(tmp_path):
    incoming = IncomingDataSet(tmp_path)
    piece = bytes(range(256)) * 4096  # 1 MiB
    written = 0
    while written <= SPILL_ABOVE - len(piece):
        incoming.write(piece)
        written += len(piece)
    incoming.file.flush()
    assert not incoming.spilled and not os.path.exists(incoming.name)
    assert incoming.buffer is not None and len(incoming.buffer) == written
    incoming.write(piece)  # past the limit: everything so far goes to the file
    incoming.write(b"tail")
    incoming.file.flush()
    incoming.close()
    assert incoming.spilled and incoming.buffer is None
    assert incoming.name.startswith(str(tmp_path)) and incoming.name.endswith(".part")
    assert stat.S_IMODE(os.stat(incoming.name).st_mode) == 0o600
    with open(incoming.name, "rb") as f:
        assert f.read() == piece * (written // len(piece) + 1) + b"tail"


def test_a_received_data_set_reads_back_in_pieces_and_hashes_as_in_memory(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 5)
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    path = tmp_path / "received.part"
    path.write_bytes(header + data)
    in_file = Received(size=len(data), file=path, offset=len(header), meta=header)
    in_memory = Received(size=len(data), data=data)
    assert b"".join(in_file.chunks(1024 * 1024)) == data
    assert in_file.digest() == in_memory.digest()


def test_the_meta_group_pynetdicom_writes_is_part10_headers(tmp_path):
    """With the tuning's replacement, pynetdicom's write of the File Meta Information gives
    the same bytes as pydicom's, so a large instance can be renamed into the spool."""
    uids = ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.4.80")
    plain = pynetdicom_tuning._create_file_meta(
        sop_class_uid=uids[0], sop_instance_uid=uids[1], transfer_syntax=uids[2]
    )
    replaced, reference = io.BytesIO(), io.BytesIO()
    pynetdicom_tuning._write_file_meta_info(replaced, plain)
    meta = create_file_meta(
        sop_class_uid=uids[0], sop_instance_uid=uids[1], transfer_syntax=uids[2]
    )
    write_file_meta_info(reference, meta)
    assert replaced.getvalue() == reference.getvalue() == part10_header(*uids)[132:]


def test_a_data_set_held_in_memory_comes_apart_from_its_header_as_written(tmp_path):
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    fragments = [os.urandom(131066), os.urandom(131066), os.urandom(17)]
    as_pynetdicom = IncomingDataSet(tmp_path)  # preamble, "DICM", the group, fragments
    for piece in (header[:128], header[128:132], header[132:], *fragments):
        as_pynetdicom.write(piece)
    assert as_pynetdicom.meta_and_data_set() == (header, b"".join(fragments))
    one = IncomingDataSet(tmp_path)
    for piece in (header[:128], header[128:132], header[132:], fragments[0]):
        one.write(piece)
    meta, data = one.meta_and_data_set()
    assert (meta, data) == (header, fragments[0]) and data is fragments[0]  # not copied
    joined = IncomingDataSet(tmp_path)  # a header that does not end a piece
    joined.write(header[:100])
    joined.write(header[100:] + fragments[0][:10])
    joined.write(fragments[0][10:])
    assert joined.meta_and_data_set() == (header, fragments[0])
    empty = IncomingDataSet(tmp_path)
    empty.write(header)
    assert empty.meta_and_data_set() == (header, b"")


def _as_pynetdicom_writes(incoming: IncomingDataSet, header: bytes, fragments: list[bytes]) -> None:
    for piece in (header[:128], header[128:132], header[132:], *fragments):
        incoming.write(piece)
        incoming.file.flush()


def test_a_data_set_written_through_is_in_its_file_as_it_arrives_and_held_too(tmp_path):
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    fragments = [os.urandom(131066), os.urandom(131066), os.urandom(17)]
    incoming = IncomingDataSet(tmp_path, write_through=True)
    _as_pynetdicom_writes(incoming, header, fragments[:1])
    # the first fragment is on its way to the disk before the rest arrives
    assert os.path.getsize(incoming.name) == len(header) + len(fragments[0])
    for piece in fragments[1:]:
        incoming.write(piece)
    assert incoming.meta_and_data_set() == (header, b"".join(fragments))  # parsed from memory
    streamed = incoming.finish_write_through()
    assert streamed is not None and str(streamed) == incoming.name
    assert streamed.read_bytes() == header + b"".join(fragments)  # the 17-byte tail too
    assert stat.S_IMODE(streamed.stat().st_mode) == 0o600
    incoming.close()  # nothing left open: closing again is harmless
    held = IncomingDataSet(tmp_path)  # not written through: no file at all
    _as_pynetdicom_writes(held, header, fragments)
    assert held.finish_write_through() is None and not os.path.exists(held.name)


def test_a_data_set_written_through_spills_into_the_same_file(tmp_path):
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    piece = os.urandom(1024 * 1024)
    incoming = IncomingDataSet(tmp_path, write_through=True)
    count = SPILL_ABOVE // len(piece) + 1
    _as_pynetdicom_writes(incoming, header, [piece] * count)
    incoming.write(b"tail")
    incoming.close()
    assert incoming.spilled and incoming.finish_write_through() is None
    with open(incoming.name, "rb") as f:
        assert f.read() == header + piece * count + b"tail"


def test_a_disk_that_refuses_the_write_through_leaves_the_data_set_held(tmp_path, monkeypatch):
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    fragments = [os.urandom(131066), os.urandom(500)]
    incoming = IncomingDataSet(tmp_path, write_through=True)

    def full(fd, buffers):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    _as_pynetdicom_writes(incoming, header, fragments)
    monkeypatch.undo()
    assert incoming.finish_write_through() is None and not os.path.exists(incoming.name)
    assert incoming.meta_and_data_set() == (header, b"".join(fragments))


def test_a_streamed_file_is_removed_unless_adopted(tmp_path):
    streamed = tmp_path / "x.part"
    streamed.write_bytes(b"data")
    Received(size=4, data=b"data", streamed=streamed).discard()
    assert not streamed.exists()
    streamed.write_bytes(b"data")
    adopted = Received(size=4, data=b"data", streamed=streamed)
    adopted.adopted()
    adopted.discard()
    assert streamed.exists()
