"""Transports: the one rule for the SEG's two forms, statuses in words, and the registry the
configuration reads destination types from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, Destination, settings_from_dict
from dicom_node.export import transport
from dicom_node.export.dicomweb import DicomWebDestination
from dicom_node.export.dimse import DicomDestination
from dicom_node.export.transport import (
    LABEL_MAP_SEG,
    Outcome,
    Outgoing,
    SegChoice,
    deliver,
    destination_settings,
    register_transport,
    status_meaning,
    transport_names,
)


def test_a_refused_label_map_goes_again_as_the_binary_seg_and_is_remembered():
    stored: list[Path] = []

    def store(path: Path) -> Outcome:
        stored.append(path)
        return Outcome(False, 0xA900, "no") if path.name == "lm" else Outcome(True, 0)

    choice = SegChoice()
    item = Outgoing(1, Path("lm"), Path("bin"))
    outcome = deliver(item, choice, store, lambda: LABEL_MAP_SEG, "pacs")
    assert outcome.ok and outcome.alternative and stored == [Path("lm"), Path("bin")]
    assert choice.refuses and choice.by_status
    # the next SEG of this attempt goes as binary at once; an SR follows its SEG's form
    stored.clear()
    deliver(Outgoing(2, Path("lm"), Path("bin")), choice, store, lambda: LABEL_MAP_SEG, "pacs")
    assert stored == [Path("bin")]
    stored.clear()
    deliver(Outgoing(3, Path("lm"), Path("bin"), "primary"), choice, store, lambda: "", "pacs")
    assert stored == [Path("lm")]


def test_another_refusal_of_the_label_map_is_not_a_reason_to_send_binary():
    calls: list[Path] = []

    def store(path: Path) -> Outcome:
        calls.append(path)
        return Outcome(False, 0xA700, "out of resources")

    choice = SegChoice()
    outcome = deliver(
        Outgoing(1, Path("lm"), Path("bin")), choice, store, lambda: LABEL_MAP_SEG, "p"
    )
    assert not outcome.ok and calls == [Path("lm")] and not choice.refuses


def test_statuses_in_words():
    assert status_meaning(0xA700) == "Refused: Out of Resources"
    assert status_meaning(0xA9FF) == "Data Set Does Not Match SOP Class"  # by its range
    assert status_meaning(0x0122) == "Refused: SOP Class Not Supported"
    assert status_meaning(0xA7FE) == "Refused: Out of Resources"
    assert status_meaning(0x1234) == "unknown status"


def test_the_configuration_reads_each_destination_as_its_transport_says():
    s = settings_from_dict(
        {
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
                {"name": "web", "type": "dicomweb", "url": "https://pacs.example/dicom-web"},
            ]
        }
    )
    assert [type(d) for d in s.destinations] == [DicomDestination, DicomWebDestination]
    assert destination_settings("nothing") is None
    assert transport_names() == {"dicom": "C-STORE", "dicomweb": "STOW-RS"}
    with pytest.raises(ConfigError, match="'dicomweb' \\(STOW-RS\\)"):
        settings_from_dict({"destinations": [{"name": "x", "type": "ftp"}]})
    with pytest.raises(ConfigError, match="unknown key 'url'"):
        settings_from_dict({"destinations": [{"name": "x", "host": "h", "url": "http://h"}]})


@dataclass(frozen=True)
class _FolderDestination(Destination):
    type: str = "folder"
    folder: Path = Path("out")


class _FolderTransport:
    settings = _FolderDestination
    protocol = "copy"

    def __init__(self, settings, destination) -> None:
        self.destination = destination


def test_a_registered_transport_brings_its_own_keys(monkeypatch, tmp_path):
    monkeypatch.setitem(transport.TRANSPORTS, "folder", _FolderTransport)
    register_transport("folder", _FolderTransport)
    s = settings_from_dict(
        {"destinations": [{"name": "f", "type": "folder", "folder": "results"}]}, base_dir=tmp_path
    )
    (dest,) = s.destinations
    assert isinstance(dest, _FolderDestination) and dest.folder == tmp_path / "results"
    assert isinstance(transport.transport_for(s, dest), _FolderTransport)
