"""``[[sources]]``: each entry typed and checked by the configuration, one sentence per
wrong value."""

from __future__ import annotations

import re

import pytest
import tomllib

from dicom_node.config import DEFAULT_CONFIG_PATH, ConfigError, settings_from_dict
from dicom_node.sources import SourceSettings


def read_sources(tables: list[dict]) -> list[SourceSettings]:
    """``[[sources]]`` as the configuration reads it."""
    return settings_from_dict({"sources": tables}).sources


def test_sources_configuration_is_typed_and_checked():
    (source,) = read_sources(
        [
            {
                "name": "pacs",
                "ae_title": "ORTHANC",
                "host": "10.0.0.5",
                "port": 4242,
                "retrieve": "get",
            }
        ]
    )
    assert source == SourceSettings("pacs", "ORTHANC", "10.0.0.5", 4242, retrieve="get")
    assert SourceSettings("a", "B", "h").retrieve == "move"
    bad = {
        "retrieve": ("move-it", "sources[0].retrieve: must be 'move' (C-MOVE to this node) or"),
        "port": (70000, "sources[0].port: 70000 is not a TCP port"),
        "ae_title": ("A\\B", "sources[0].ae_title: 'A\\\\B' is not a valid AE title"),
        "colour": ("red", "[sources[0]]: unknown key 'colour'"),
        "timeout_seconds": (0, "sources[0].timeout_seconds: must be positive"),
    }
    for key, (value, message) in bad.items():
        entry = {"name": "pacs", "ae_title": "ORTHANC", "host": "h", key: value}
        with pytest.raises(ConfigError) as caught:
            read_sources([entry])
        assert str(caught.value).startswith(message), str(caught.value)
    with pytest.raises(ConfigError, match=r"sources\[1\]\.name: 'pacs' is used twice"):
        read_sources([{"name": "pacs", "ae_title": "A", "host": "h"}] * 2)
    with pytest.raises(ConfigError, match=r"\[sources\[0\]\]: missing required key 'host'"):
        read_sources([{"name": "pacs", "ae_title": "A"}])


def _commented_example(marker: str) -> str:
    """The commented-out TOML example of ``config/node.toml`` (a paragraph) holding
    ``marker``, uncommented."""
    (paragraph,) = [p for p in DEFAULT_CONFIG_PATH.read_text().split("\n\n") if marker in p]
    return "\n".join(
        line[2:] for line in paragraph.splitlines() if re.match(r"^# (\[\[|\w+ = )", line)
    )


def test_the_shipped_examples_of_sources_and_commitment_are_valid():
    (source,) = settings_from_dict(tomllib.loads(_commented_example("# [[sources]]"))).sources
    assert (source.name, source.retrieve, source.top_up) == ("pacs", "move", False)
    example = tomllib.loads(_commented_example('# name = "archive"'))
    (destination,) = settings_from_dict(example).destinations
    assert destination.asks_commitment()
    assert (destination.commitment_requests, destination.commitment_resend_seconds) == (3, 300)
