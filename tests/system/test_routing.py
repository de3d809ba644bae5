"""Routing through a node: a series no rule matches is kept, "no model"; one series to two
models gives two result sets."""

from __future__ import annotations

import io
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import highdicom as hd
import pydicom
import pytest

from dicom_node.config import PROJECT_ROOT
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, chromium, free_port, storescu

pytestmark = pytest.mark.cost(40)

SPLEEN = str(PROJECT_ROOT / "bundles" / "spleen_ct_demo")
LIVER = str(PROJECT_ROOT / "bundles" / "liver_ct_demo")


def test_a_series_no_rule_matches_is_kept_as_no_model(tmp_path, dcmtk_tools):
    node = NodeProcess(
        tmp_path / "node",
        node={"settle_seconds": 0.5},
        models=[{"name": "spleen", "triton_model": "spleen_seg", "bundle": SPLEEN}],
        routes=[{"models": ["spleen"], "body_part": ["ABDOMEN"]}],
    ).start()
    try:
        ph = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=21)
        chest = SeriesAttributes(body_part_examined="CHEST")
        abdomen = SeriesAttributes(body_part_examined="ABDOMEN")
        write_ct_series(ph.hu, tmp_path / "chest", spacing=ph.spacing, attrs=chest)
        write_ct_series(ph.hu, tmp_path / "abdomen", spacing=ph.spacing, attrs=abdomen)
        assert storescu(node.port, tmp_path / "chest").returncode == 0
        assert storescu(node.port, tmp_path / "abdomen").returncode == 0
        jobs = node.wait_for(
            lambda js: len(js) == 2 and all(j["state"] in ("done", "no_model") for j in js),
            180,
            "both series finished",
            failures_allowed=False,
        )
        by_uid = {j["series_uid"]: j for j in jobs}
        kept = by_uid[chest.series_instance_uid]
        assert kept["state"] == "no_model"
        assert kept["reason"].startswith("no routing rule matched (modality CT, body part CHEST")
        assert kept["instance_count"] == 40
        assert len(list((node.data_dir / "spool").glob(f"*/{chest.series_instance_uid}/*"))) == 40
        done = by_uid[abdomen.series_instance_uid]
        assert done["state"] == "done" and done["model"] == "spleen"
    finally:
        node.stop()


def test_one_series_to_two_models_gives_two_result_sets(tmp_path, orthanc, dcmtk_tools):
    status_port = free_port()
    node = NodeProcess(
        tmp_path / "node",
        node={"settle_seconds": 0.5},
        status={"enabled": True, "host": "127.0.0.1", "port": status_port},
        models=[
            {"name": "spleen", "triton_model": "spleen_seg", "bundle": SPLEEN},
            {"name": "liver", "triton_model": "liver_seg", "bundle": LIVER},
        ],
        routes=[{"models": ["spleen", "liver"], "body_part": ["ABDOMEN"]}],
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
    ).start()
    try:
        ph = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=23)
        attrs = SeriesAttributes(body_part_examined="ABDOMEN")
        write_ct_series(ph.hu, tmp_path / "ct", spacing=ph.spacing, attrs=attrs)
        assert storescu(node.port, tmp_path / "ct").returncode == 0
        (job,) = node.wait_for(
            lambda js: (
                js
                and js[0]["state"] == "done"
                and len(js[0]["outbox"]) == 6
                and all(o["state"] == "sent" for o in js[0]["outbox"])
            ),
            300,
            "both models' results sent",
            failures_allowed=False,
        )
        assert job["model"] == "spleen, liver"
        assert set(job["results"]["models"]) == {"spleen", "liver"}
        segs = [
            i
            for i in orthanc.rest(
                "/tools/find",
                {
                    "Level": "Instance",
                    "Expand": True,
                    "Query": {"StudyInstanceUID": attrs.study_instance_uid, "Modality": "SEG"},
                },
            )
        ]
        labels = set()
        for inst in segs:
            seg = hd.seg.Segmentation.from_dataset(
                pydicom.dcmread(io.BytesIO(orthanc.file(inst["ID"])))
            )
            labels.add(tuple(d.segment_label for d in seg.SegmentSequence))
        assert labels == {("spleen",), ("liver",)}
        volumes = job["results"]["models"]
        assert volumes["spleen"]["volumes_ml"]["spleen"] > 0
        assert volumes["liver"]["volumes_ml"]["liver"] > volumes["spleen"]["volumes_ml"]["spleen"]
        _job_page_shows_both_models(
            f"http://127.0.0.1:{status_port}/jobs/{job['series_uid']}", volumes, tmp_path
        )
    finally:
        node.stop()


class _Sections(HTMLParser):
    """Per model section of a job page: its volume rows, preview images and file links."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, dict[str, list]] = {}
        self._model: str | None = None
        self._in_volumes = False
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section" and "model" in a.get("class", "").split():
            self._model = a["data-model"]
            self.models[self._model] = {"volumes": [], "previews": [], "files": []}
        elif self._model is None:
            return
        elif tag == "img" and "preview" in a.get("class", "").split():
            self.models[self._model]["previews"].append(a["src"])
        elif tag == "a" and "download" in a:
            self.models[self._model]["files"].append(a["href"])
        elif tag == "table":
            self._in_volumes = "volumes" in a.get("class", "").split()
        elif tag == "tr" and self._in_volumes:
            self._row = []

    def handle_data(self, data: str) -> None:
        if self._row is not None and data.strip():
            self._row.append(data.strip())

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._model = None
        elif tag == "table":
            self._in_volumes = False
        elif tag == "tr" and self._row is not None and self._model is not None:
            self.models[self._model]["volumes"].append(tuple(self._row))
            self._row = None


def _job_page_shows_both_models(url: str, volumes: dict, tmp_path: Path) -> None:
    """The job page, as Chromium renders it, holds every model's results: volumes,
    key slices drawn from its own SEG, and its own files."""
    run = chromium("--dump-dom", url, profile=tmp_path / "profile")
    assert run.returncode == 0, run.stderr[-2000:]
    page = _Sections()
    page.feed(run.stdout)
    assert list(page.models) == ["spleen", "liver"], run.stdout[-3000:]
    for model, shown in page.models.items():
        ((label, ml),) = shown["volumes"]
        assert label == model
        assert ml == f"{volumes[model]['volumes_ml'][model]:.1f} ml"
        assert shown["previews"], model
        for src in shown["previews"]:
            assert parse_qs(urlsplit(src).query)["model"] == [model]
            with urllib.request.urlopen(urljoin(url, src), timeout=30) as r:
                assert (
                    r.headers["Content-Type"] == "image/png" and r.read(8) == b"\x89PNG\r\n\x1a\n"
                )
        kinds = []
        for href in shown["files"]:
            kinds.append(urlsplit(href).path.rsplit("/", 1)[1])
            with urllib.request.urlopen(urljoin(url, href), timeout=30) as r:
                written = Path(volumes[model]["files"][kinds[-1]]["path"])
                assert r.read() == written.read_bytes()
        assert kinds == ["SEG", "RTSTRUCT", "SR"]
