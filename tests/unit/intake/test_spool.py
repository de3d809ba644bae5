"""The spool: UIDs to paths that never leave it, durable writes, and what a crash leaves."""

from __future__ import annotations

import pytest

from dicom_node.intake.spool import InvalidUID, Spool, check_uid, dataset_digest


def test_a_crafted_uid_never_places_a_file_outside_the_spool(tmp_path):
    spool = Spool(tmp_path / "spool")
    for uid in ("../../etc", "1.2/3", "1.2\\3", "", " ", "1." * 40, "1.2.\x00"):
        with pytest.raises(InvalidUID):
            spool.path_for("1.2", "1.2.3", uid)
    assert check_uid(" 1.2.03 \x00", "SOP") == "1.2.03"  # padding and old leading zeros pass
    path = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    assert path == spool.root / "1.2" / "1.2.3" / "1.2.3.4.dcm"


def test_writes_adopts_and_copies_land_whole(tmp_path):
    spool = Spool(tmp_path / "spool")
    a = spool.path_for("1.2", "1.2.3", "1.1")
    assert spool.write(a, b"head", b"", b"body") == 8 and a.read_bytes() == b"headbody"
    received = spool.incoming / "x.part"
    received.write_bytes(b"whole file")
    b = spool.path_for("1.2", "1.2.3", "1.2")
    assert spool.adopt(received, b) == 10 and not received.exists()
    source = tmp_path / "big"
    source.write_bytes(b"META" + b"x" * 3_000_000)
    c = spool.path_for("1.2", "1.2.3", "1.3")
    assert spool.copy_in(c, b"HEAD", source, 4) == 3_000_004
    assert c.read_bytes()[:5] == b"HEADx"
    assert spool.all_files() == [a, b, c]


def test_what_a_crash_left_is_cleaned_or_set_aside_never_deleted(tmp_path):
    spool = Spool(tmp_path / "spool")
    (spool.incoming / "half.part").write_bytes(b"partial")
    assert spool.clean_incoming() == 1
    bad = spool.path_for("1.2", "1.2.3", "9.9")
    spool.write(bad, b"not dicom")
    moved = spool.quarantine(bad, "unreadable")
    assert not bad.exists() and moved.read_bytes() == b"not dicom"
    assert moved.with_name(moved.name + ".reason.txt").read_text() == "unreadable\n"


def test_the_digest_ignores_who_wrote_the_file():
    data_set = b"\x08\x00\x16\x00UI\x04\x001.2\x00"
    meta = b"\x02\x00\x00\x00UL\x04\x00" + (6).to_bytes(4, "little") + b"SENDER"
    file = b"\x00" * 128 + b"DICM" + meta + data_set
    assert dataset_digest(file) == dataset_digest(data_set, has_meta=False)
