"""The status service of a running node, seen from a real browser and from Prometheus' side.

One node runs in this process with the local backend and ``[status]`` enabled; a phantom CT
goes in over C-STORE (DCMTK's storescu) and through the whole chain. Its one destination
listens nowhere, so the export attempts fail and are retried until the node gives up.
Headless Chromium (Debian's ``chromium``) loads the job page; the preview PNGs it references
are compared, pixel by pixel, with the outline of the SEG read back by highdicom.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import shutil
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import numpy as np
import pydicom
import pytest
import scipy.ndimage
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.config import settings_from_dict
from dicom_node.encode import segment_info_for
from dicom_node.node import Node
from dicom_node.series.volume import assemble_series
from dicom_node.service.status import create_app
from dicom_node.service.web import WebServer
from dicom_node.state import JobDatabase, OutboxState, SeriesState
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests import checks
from tests.peers import ROOT, chromium, free_port, storescu, wait_for

pytestmark = pytest.mark.cost(12)

SPLEEN_RGB = segment_info_for(1, "spleen").color_rgb
STAGES = ("assemble", "pre", "inference", "post", "encode", "write")


# -- helpers ---------------------------------------------------------------------------
def get(url: str) -> tuple[int, bytes, str]:
    """Status, body and content type of a GET (errors are answers too)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (urllib would normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body, ctype = get(f"{base}/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class _Images(HTMLParser):
    """The preview <img> elements and download links of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.previews: list[dict[str, str]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img" and "preview" in a.get("class", "").split():
            self.previews.append(a)
        if tag == "a" and "download" in a:
            self.links.append(a["href"])


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node(tmp_path_factory):
    work = tmp_path_factory.mktemp("status-node")
    settings = settings_from_dict(
        {
            "node": {
                "ae_title": "DICOM_NODE",
                "host": "127.0.0.1",
                "port": free_port(),
                "data_dir": str(work / "var"),
                "settle_seconds": 0.5,
            },
            "limits": {"min_free_disk_mb": 1},
            "inference": {"backend": "local", "device": "cpu", "max_concurrent_jobs": 1},
            "status": {"enabled": True, "host": "127.0.0.1", "port": 0},
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": free_port(),
                    "attempts": 2,
                    "retry_backoff_seconds": 0.2,
                    "max_backoff_seconds": 0.5,
                }
            ],
        },
        base_dir=ROOT,
    )
    n = Node(settings)
    n.start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def processed(node, tmp_path_factory, dcmtk_tools):
    """A phantom series sent, processed and given up on by the exporter; metrics around it."""
    base = node.status.url
    before = scrape(base)
    phantom = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=31)
    attrs = SeriesAttributes(patient_id="STATUS-1")
    ct_dir = tmp_path_factory.mktemp("status-ct")
    ct_paths = write_ct_series(
        phantom.hu, ct_dir, spacing=phantom.spacing, origin=phantom.origin, attrs=attrs
    )
    uid = attrs.series_instance_uid
    assert storescu(node.settings.node.port, ct_dir).returncode == 0
    record = wait_for(
        lambda: (
            (r := node.jobs.series.get(uid)) is not None
            and r.state in (SeriesState.DONE, SeriesState.FAILED)
            and r
        ),
        300,
        "the series processed",
    )
    assert record.state == SeriesState.DONE, record.reason
    wait_for(
        lambda: [o.state for o in node.jobs.outbox.items(uid)] == [OutboxState.FAILED] * 3,
        60,
        "the exporter giving up on the unreachable destination",
    )
    return {
        "uid": uid,
        "before": before,
        "after": scrape(base),
        "ct_paths": ct_paths,
        "record": node.jobs.series.get(uid),
    }


# -- tests -----------------------------------------------------------------------------
def test_metrics_follow_a_series_through_the_chain(processed):
    before, after = processed["before"], processed["after"]
    received = "dicom_node_instances_received_total"
    assert (
        metric(after, received, status="0x0000", outcome="stored")
        - metric(before, received, status="0x0000", outcome="stored")
    ) == 40
    assert (
        metric(after, "dicom_node_series", state="done")
        - metric(before, "dicom_node_series", state="done")
    ) == 1
    for stage in STAGES:
        count = "dicom_node_stage_duration_seconds_count"
        assert metric(after, count, stage=stage) - metric(before, count, stage=stage) >= 1, stage
        total = "dicom_node_stage_duration_seconds_sum"
        assert metric(after, total, stage=stage) > metric(before, total, stage=stage), stage
    attempts = "dicom_node_export_attempts_total"
    assert metric(after, attempts, destination="pacs", result="failed") >= 3
    assert metric(after, attempts, destination="pacs", result="gave_up") >= 3
    assert metric(after, "dicom_node_export_retries_total", destination="pacs") >= 3
    assert metric(after, "dicom_node_queue_depth", queue="export") == 0
    assert metric(after, "dicom_node_queue_depth", queue="processing") == 0
    # Present from the start, though no request went to Triton here.
    assert ("dicom_node_triton_request_duration_seconds_count", ()) in after


def test_jobs_page_lists_the_series(node, processed):
    status, body, ctype = get(node.status.url + "/")
    assert status == 200 and ctype.startswith("text/html")
    page = body.decode()
    row = page[page.index(f'data-series-uid="{processed["uid"]}"') :]
    row = row[: row.index("</tr>")]
    assert 'data-state="done"' in row
    assert '<td class="num">40</td>' in row
    assert processed["record"].model and processed["record"].model in row
    assert f'href="/jobs/{processed["uid"]}"' in row
    timing_cells = [f"{processed['record'].timings[s]:.2f}" for s in STAGES]
    assert all(f'<td class="num">{t}</td>' in row for t in timing_cells), timing_cells


def test_the_job_page_and_the_jobs_listing_name_the_weights(node, processed):
    import hashlib

    (model,) = processed["record"].results.models
    (bundle,) = (m.bundle for m in node.settings.models if m.name == model.model)
    digest = hashlib.sha256((Path(bundle) / "models" / "model.ts").read_bytes()).hexdigest()
    assert model.algorithm["weights_sha256"] == digest
    assert model.algorithm["name"] == "Spleen CT segmentation (demo)"
    status, body, _ = get(f"{node.status.url}/jobs/{processed['uid']}")
    assert status == 200 and f"<code>{digest}</code>" in body.decode()
    # what `dicom-node jobs --json` prints
    listing = [r.to_json() for r in node.jobs.listing()]
    (row,) = (r for r in listing if r["series_uid"] == processed["uid"])
    assert row["results"]["models"][model.model]["algorithm"] == model.algorithm


def test_job_page_in_chromium_shows_the_spleen_outlined(node, processed, tmp_path):
    url = f"{node.status.url}/jobs/{processed['uid']}"
    run = chromium("--dump-dom", url, profile=tmp_path / "profile")
    assert run.returncode == 0, run.stderr[-2000:]
    parsed = _Images()
    parsed.feed(run.stdout)
    assert len(parsed.previews) == 3, run.stdout[-3000:]

    source = assemble_series(processed["ct_paths"])
    (spleen_results,) = processed["record"].results
    seg_path = Path(spleen_results.files["SEG"].path)
    spleen = checks.seg_mask(seg_path, source)
    areas = spleen.sum(axis=(1, 2))
    shown = [int(img["data-slice"]) for img in parsed.previews]
    assert int(np.argmax(areas)) in shown, (shown, areas)
    for img in parsed.previews:
        k = int(img["data-slice"])
        assert img["data-sop-uid"] == source.source_uids[k]
        status, png, ctype = get(urljoin(url, img["src"]))
        assert status == 200 and ctype == "image/png"
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert rgb.shape[:2] == spleen.shape[1:]
        drawn = np.all(rgb == SPLEEN_RGB, axis=-1)
        edge = spleen[k] & ~scipy.ndimage.binary_erosion(spleen[k], border_value=0)
        assert edge.sum() > 0, k
        assert np.array_equal(drawn, edge), (k, int(drawn.sum()), int(edge.sum()))
        inside = spleen[k] & ~edge  # the CT shows through inside the outline, in grey
        assert np.all(rgb[inside][:, 0] == rgb[inside][:, 1])

    # The browser draws them: the screenshot holds the outline colour.
    shot = tmp_path / "job.png"
    run = chromium(
        f"--screenshot={shot}", "--window-size=1400,1800", url, profile=tmp_path / "profile2"
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    close = np.all(np.abs(pixels - np.array(SPLEEN_RGB)) <= 3, axis=-1)
    assert close.sum() >= 100, int(close.sum())

    # The download links give the files the node wrote.
    kinds = [urlsplit(link).path.rsplit("/", 1)[1] for link in parsed.links]
    assert kinds == ["SEG", "RTSTRUCT", "SR"]
    for link, kind in zip(parsed.links, kinds, strict=True):
        assert parse_qs(urlsplit(link).query)["model"] == [spleen_results.model]
        status, data, ctype = get(urljoin(url, link))
        assert status == 200 and ctype == "application/dicom"
        written = Path(spleen_results.files[kind].path)
        assert data == written.read_bytes()
        assert pydicom.dcmread(io.BytesIO(data)).Modality == kind


def test_health_and_readiness(node, processed):
    base = node.status.url
    status, body, _ = get(base + "/healthz")
    assert status == 200
    status, body, _ = get(base + "/readyz")
    assert status == 200, body

    # The same node's data, with a watermark above the free space and a backend that is
    # not ready: both reasons are given.
    free_mb = shutil.disk_usage(node.settings.node.data_dir).free // (1024 * 1024)
    settings = node.settings.replace(
        limits=dataclasses.replace(node.settings.limits, min_free_disk_mb=free_mb + 10_000)
    )
    app = create_app(settings, node.jobs, node.metrics, backend_ready=lambda: False)
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    try:
        status, body, ctype = get(server.url + "/readyz")
        assert status == 503 and ctype == "application/json"
        text = body.decode()
        assert "min_free_disk_mb" in text and "inference backend is not ready" in text
        status, _, _ = get(server.url + "/healthz")
        assert status == 200
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/healthz", timeout=5)


def test_urls_never_reach_files_outside_the_data_dir(node, processed, tmp_path_factory):
    secret = tmp_path_factory.mktemp("outside") / "secret.txt"
    secret.write_text("TOP-SECRET-7431")
    uid = processed["uid"]
    data_dir = node.settings.node.data_dir
    up = "..%2F" * (len(data_dir.parts) + 4)
    paths = [
        f"/jobs/{up}etc%2Fpasswd",
        "/jobs/../../../../etc/passwd",
        f"/jobs/{up}{str(secret).lstrip('/').replace('/', '%2F')}",
        "/jobs/1.2.3.abc",
        "/jobs/1.2.840.999999.1",  # well formed, unknown
        "/jobs/%2e%2e/files/SEG",
        f"/jobs/{uid}/files/..%2F..%2Fjobs.sqlite",
        f"/jobs/{uid}/files/jobs.sqlite",
        f"/jobs/{uid}/previews/index.json",
        f"/jobs/{uid}/previews/..%2Fseg.dcm",
        f"/jobs/{uid}/previews/{up}{str(secret).lstrip('/').replace('/', '%2F')}",
        f"/jobs/{uid}%2F..%2F..%2F..%2Fjobs.sqlite/files/SEG",
    ]
    for path in paths:
        status, body = raw_get(node.status.port, path)
        assert status in (400, 404), (path, status)
        assert b"TOP-SECRET" not in body and b"root:" not in body
        assert b"SQLite format" not in body and b"DICM" not in body, path


# -- credentials -------------------------------------------------------------------------
def _get_with(url: str, authorization: str | None = None) -> tuple[int, str]:
    """Status and WWW-Authenticate header of a GET sending ``authorization``."""
    req = urllib.request.Request(url)
    if authorization is not None:
        req.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("WWW-Authenticate", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("WWW-Authenticate", "")


def _served(tmp_path: Path, status: dict) -> tuple[WebServer, JobDatabase]:
    from dicom_node.service.metrics import NodeMetrics

    settings = settings_from_dict(
        {
            "node": {"data_dir": str(tmp_path / "var")},
            "status": {"enabled": True, "port": 0, **status},
        },
        base_dir=ROOT,
    )
    (tmp_path / "var" / "spool").mkdir(parents=True)
    jobs = JobDatabase(tmp_path / "var" / "jobs.sqlite")
    app = create_app(settings, jobs, NodeMetrics(jobs))
    server = WebServer(app, settings.status.host, 0)
    server.start()
    return server, jobs


def test_basic_credentials_from_a_file_guard_every_page_but_the_probes(tmp_path):
    secret = tmp_path / "status.secret"
    secret.write_text("radiology:correct horse\n")
    server, jobs = _served(tmp_path, {"auth": "basic", "credentials_file": str(secret)})
    try:
        base = f"http://127.0.0.1:{server.port}"
        good = "Basic " + base64.b64encode(b"radiology:correct horse").decode()
        bad = "Basic " + base64.b64encode(b"radiology:wrong").decode()
        for path in ("/", "/metrics", "/jobs/1.2.3"):
            code, challenge = _get_with(base + path)
            assert (code, challenge) == (401, 'Basic realm="dicom-node", charset="UTF-8"'), path
            assert _get_with(base + path, bad)[0] == 401, path
            assert _get_with(base + path, "Bearer correct horse")[0] == 401, path
        assert _get_with(base + "/", good)[0] == 200
        assert _get_with(base + "/metrics", good)[0] == 200
        assert _get_with(base + "/jobs/1.2.3", good)[0] == 404  # past the check: no such job
        assert _get_with(base + "/healthz")[0] == 200  # probes need no secret
        assert _get_with(base + "/readyz")[0] in (200, 503)
    finally:
        server.stop()
        jobs.close()


def test_a_bearer_token_from_the_environment_lets_the_pages_leave_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("STATUS_TOKEN", "tok-3f9a")
    server, jobs = _served(
        tmp_path, {"host": "0.0.0.0", "auth": "bearer", "credentials_env": "STATUS_TOKEN"}
    )
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _get_with(base + "/") == (401, 'Bearer realm="dicom-node"')
        assert _get_with(base + "/", "Bearer tok-3f9a")[0] == 200
        assert _get_with(base + "/", "Bearer tok-3f9")[0] == 401
    finally:
        server.stop()
        jobs.close()


def test_the_status_service_refuses_to_leave_loopback_without_credentials(tmp_path):
    from dicom_node.config import Settings, StatusSettings
    from dicom_node.service.metrics import NodeMetrics
    from dicom_node.service.status import StatusError

    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    exposed = Settings(status=StatusSettings(enabled=True, host="0.0.0.0"))
    with pytest.raises(StatusError, match="reachable beyond this machine on 0.0.0.0"):
        create_app(exposed, jobs, NodeMetrics(jobs))
    unreadable = Settings(
        status=StatusSettings(auth="basic", credentials_file=tmp_path / "missing")
    )
    with pytest.raises(StatusError, match="status.credentials_file: .*missing cannot be read"):
        create_app(unreadable, jobs, NodeMetrics(jobs))
    jobs.close()
