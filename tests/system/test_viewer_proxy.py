"""The viewer's proxy forwards only the DICOMweb requests OHIF makes, from the viewer's own
page, to the embedded Orthanc; Orthanc itself serves only the node.

Against the real embedded PACS (Debian's Orthanc 1.10 with its DICOMweb plugin, started by
:class:`dicom_node.service.embedded.Embedded` as the node starts it) and the real proxy: every
encoding of a path traversal to Orthanc's REST API (``/system``, ``/tools/bulk-delete``,
``/instances/<id>/modify``) is refused and nothing is deleted or changed (Orthanc's own
instance count and data before and after); so are requests from another origin. OHIF's own
requests (QIDO, WADO-RS metadata, STOW-RS) still go through. Requests are sent over raw
sockets so that each path reaches the server exactly as written.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import settings_from_dict
from dicom_node.service.embedded import Embedded, embedded_destination
from dicom_node.service.viewer import dicomweb_target
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import free_port

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = [
    pytest.mark.skipif(not PLUGIN.exists(), reason="needs orthanc-dicomweb"),
    pytest.mark.cost(5),
]


class Pacs:
    def __init__(self, embedded: Embedded, http_port: int, dicom_port: int, study: str) -> None:
        self.embedded = embedded
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.study = study
        self.viewer_port = int(embedded.viewer_url.rsplit(":", 1)[1].strip("/"))

    def orthanc(self, path: str) -> object:
        """Orthanc's REST API, asked directly on loopback (the node's own access)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def raw(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request`` to the viewer as bytes; the HTTP status and body."""
        with socket.create_connection(("127.0.0.1", self.viewer_port), timeout=30) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body


def _request(
    method: str,
    target: str,
    port: int,
    body: bytes = b"",
    content_type: str = "",
    origin: str | None = None,
    host: str | None = None,
) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host or f'127.0.0.1:{port}'}",
        "Connection: close",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[Pacs]:
    work = tmp_path_factory.mktemp("viewer-proxy")
    viewer = work / "viewer"
    viewer.mkdir()
    (viewer / "index.html").write_text("<html>the viewer</html>")
    http_port, dicom_port = free_port(), free_port()
    settings = settings_from_dict(
        {
            "node": {"data_dir": str(work / "data"), "port": free_port()},
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": dicom_port,
                    "embedded": True,
                }  # fmt: skip
            ],
            "embedded": {
                "viewer_port": 0,
                "orthanc_http_port": http_port,
                "viewer_dir": str(viewer),
            },
        },
        base_dir=work,
    )
    destination = embedded_destination(settings)
    assert destination is not None
    embedded = Embedded(settings, destination)
    embedded.start()
    attrs = SeriesAttributes()
    paths = write_ct_series(np.zeros((3, 16, 16), np.int16), work / "ct", attrs=attrs)
    try:
        for path in paths:
            req = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/instances",
                data=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            urllib.request.urlopen(req, timeout=30).read()
        yield Pacs(embedded, http_port, dicom_port, attrs.study_instance_uid)
    finally:
        embedded.stop()


TRAVERSALS = [
    "/dicom-web/../system",
    "/dicom-web/studies/../../system",
    "/dicom-web/./studies",
    "/dicom-web/%2e%2e/system",
    "/dicom-web/%2E%2E/system",
    "/dicom-web/.%2e/system",
    "/dicom-web/..%2fsystem",
    "/dicom-web/..%2Fsystem",
    "/dicom-web/..%5csystem",
    "/dicom-web/..%5Csystem",
    "/dicom-web/%252e%252e/system",
    "/dicom-web/..%252fsystem",
    "/dicom-web/..\\system",
    "/dicom-web/%2e%2e%2f%2e%2e%2fsystem",
    "/dicom-web/studies%2f..%2f..%2fsystem",
    "/dicom-web/%00/../system",
    "/dicom-web/system",
    "/dicom-web/instances/x/modify",
    "/dicom-web/tools/find",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_no_path_reaches_orthanc_outside_dicomweb(pacs, target):
    status, body = pacs.raw(_request("GET", target, pacs.viewer_port))
    assert 400 <= status < 500, (status, body[:200])
    assert b"ApiVersion" not in body and b"DicomAet" not in body  # not Orthanc's /system


@pytest.mark.parametrize(
    "target",
    [
        "/dicom-web/..%2ftools%2fbulk-delete",
        "/dicom-web/%2e%2e/tools/bulk-delete",
        "/dicom-web/..%5ctools%5cbulk-delete",
        "/dicom-web/studies/../../tools/bulk-delete",
        "/dicom-web/..%252ftools%252fbulk-delete",
    ],
)
def test_bulk_delete_through_the_proxy_deletes_nothing(pacs, target):
    before = pacs.orthanc("/instances")
    assert len(before) == 3
    body = json.dumps({"Resources": before}).encode()
    origin = f"http://127.0.0.1:{pacs.viewer_port}"
    for sender_origin in (origin, "http://evil.example", None):
        status, _ = pacs.raw(
            _request("POST", target, pacs.viewer_port, body, "text/plain", sender_origin)
        )
        assert 400 <= status < 500
    assert pacs.orthanc("/instances") == before


def test_modify_through_the_proxy_changes_nothing(pacs):
    instance = pacs.orthanc("/instances")[0]
    tags = pacs.orthanc(f"/instances/{instance}/simplified-tags")
    body = json.dumps({"Replace": {"PatientName": "Changed^By^Attacker"}, "Force": True}).encode()
    origin = f"http://127.0.0.1:{pacs.viewer_port}"
    for target in (
        f"/dicom-web/..%2finstances%2f{instance}%2fmodify",
        f"/dicom-web/../instances/{instance}/modify",
        f"/dicom-web/%2e%2e/instances/{instance}/modify",
    ):
        status, _ = pacs.raw(_request("POST", target, pacs.viewer_port, body, "text/plain", origin))
        assert 400 <= status < 500
    assert pacs.orthanc(f"/instances/{instance}/simplified-tags") == tags
    assert len(pacs.orthanc("/instances")) == 3


def test_requests_from_another_origin_are_refused(pacs):
    port = pacs.viewer_port
    for request in (
        _request("GET", "/dicom-web/studies", port, origin="http://evil.example"),
        _request("GET", "/dicom-web/studies", port, host="evil.example"),
        _request(
            "GET", "/dicom-web/studies", port, host="evil.example", origin="http://evil.example"
        ),
        _request("POST", "/dicom-web/studies", port, b"x", 'multipart/related; boundary="b"'),
    ):
        status, _ = pacs.raw(request)
        assert status == 403


def test_methods_the_viewer_does_not_use_are_refused(pacs):
    origin = f"http://127.0.0.1:{pacs.viewer_port}"
    for method in ("DELETE", "PUT", "PATCH"):
        status, _ = pacs.raw(
            _request(method, f"/dicom-web/studies/{pacs.study}", pacs.viewer_port, origin=origin)
        )
        assert status == 405
    status, _ = pacs.raw(
        _request("POST", "/dicom-web/studies", pacs.viewer_port, b"{}", "text/plain", origin)
    )
    assert status == 415  # a text/plain POST (no CORS preflight) is not STOW-RS
    assert len(pacs.orthanc("/instances")) == 3


def test_the_viewer_still_reads_and_stores(pacs, tmp_path):
    """QIDO-RS, WADO-RS metadata and a frame, and STOW-RS from the viewer's own page."""
    port, origin = pacs.viewer_port, f"http://127.0.0.1:{pacs.viewer_port}"
    status, body = pacs.raw(_request("GET", "/dicom-web/studies?limit=10&offset=0", port))
    assert status == 200 and pacs.study.encode() in body
    status, body = pacs.raw(_request("GET", f"/dicom-web/studies/{pacs.study}/series", port))
    assert status == 200
    series = json.loads(body)[0]["0020000E"]["Value"][0]
    status, body = pacs.raw(
        _request(
            "GET", f"/dicom-web/studies/{pacs.study}/series/{series}/metadata", port, origin=origin
        )  # fmt: skip
    )
    assert status == 200 and len(json.loads(body)) == 3
    sop = json.loads(body)[0]["00080018"]["Value"][0]
    status, body = pacs.raw(
        _request(
            "GET", f"/dicom-web/studies/{pacs.study}/series/{series}/instances/{sop}/frames/1", port
        )  # fmt: skip
    )
    assert status == 200 and len(body) >= 16 * 16 * 2
    extra = write_ct_series(np.zeros((1, 16, 16), np.int16), tmp_path, attrs=SeriesAttributes())[
        0
    ].read_bytes()
    stow = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + extra + b"\r\n--b--\r\n"
    ctype = 'multipart/related; type="application/dicom"; boundary=b'
    status, _ = pacs.raw(_request("POST", "/dicom-web/studies", port, stow, ctype, origin))
    assert status == 200
    assert len(pacs.orthanc("/instances")) == 4
    pacs.orthanc("/instances")  # (the count is restored for any test after this one)
    added = [i for i in pacs.orthanc("/instances")]
    for instance in added:
        tags = pacs.orthanc(f"/instances/{instance}/simplified-tags")
        if tags["StudyInstanceUID"] != pacs.study:
            req = urllib.request.Request(
                f"http://127.0.0.1:{pacs.http_port}/instances/{instance}", method="DELETE"
            )
            urllib.request.urlopen(req, timeout=30).read()
    assert len(pacs.orthanc("/instances")) == 3


def _global_address() -> str | None:
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout.split()
    return next((w.split("/")[0] for w in out if w.count(".") == 3 and "/" in w), None)


def test_orthanc_serves_no_other_host(pacs):
    """Orthanc 1.10 listens on every interface (it has no bind address): its HTTP refuses a
    client that is not 127.0.0.1 (here the machine's own non-loopback address), and its DICOM port refuses an echo from anyone but the
    node's AE title at 127.0.0.1."""
    address = _global_address()
    if address is not None:
        with socket.socket() as s:
            s.bind((address, 0))
            s.settimeout(10)
            s.connect((address, pacs.http_port))
            s.sendall(b"GET /system HTTP/1.0\r\nHost: x\r\n\r\n")
            reply = s.recv(65536)
        # refused (401: Orthanc asks a remote client for credentials it has none of)
        assert reply.split(b" ", 2)[1] in (b"401", b"403"), reply[:200]
        assert b"ApiVersion" not in reply
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title="ORTHANC")
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        assert not status or status.Status != 0
    else:
        assert assoc.is_rejected or assoc.is_aborted


@pytest.mark.parametrize(
    ("raw", "decoded", "expected"),
    [
        ("/dicom-web/studies", "/dicom-web/studies", "/dicom-web/studies"),
        ("/dicom-web/studies?PatientID=1", "/dicom-web/studies", "/dicom-web/studies?PatientID=1"),
        (
            "/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/7FE00010",
            "/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/7FE00010",
            None,
        ),  # fmt: skip
        (
            "/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/1,2,3",
            "/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/1,2,3",
            None,
        ),  # fmt: skip
        ("/dicom-web/%2e%2e/system", "/dicom-web/../system", 400),
        ("/dicom-web/studies/1.2/series/../../..", "/dicom-web/studies/1.2/series/../../..", 400),
        ("/dicom-web/studies/x", "/dicom-web/studies/x", 404),
    ],
)
def test_dicomweb_target(raw, decoded, expected):
    target = dicomweb_target("GET", raw, decoded)
    if expected is None:
        assert target == raw
    elif isinstance(expected, int):
        assert target.status == expected  # type: ignore[union-attr]
    else:
        assert target == expected


def test_the_proxy_audits_reads_and_refusals(pacs, tmp_path):
    """With an audit trail, a study's metadata read through the viewer is a DICOM Instances
    Accessed message and a refused request a Security Alert (Use of Restricted Function),
    both valid against the PS3.15 schema."""
    import lxml.etree as etree

    from dicom_node.config import AuditSettings
    from dicom_node.service.audit import AuditLogger, AuditTrail
    from dicom_node.service.viewer import viewer_app
    from tests.checks import audit_schema

    schema = audit_schema()
    audit_file = tmp_path / "audit.log"
    trail = AuditTrail(AuditLogger(AuditSettings(enabled=True), audit_file), "DICOM_NODE")
    app = viewer_app(tmp_path, pacs.http_port, audit=trail)
    client = app.test_client()
    study = pacs.study
    series_rsp = client.get(f"/dicom-web/studies/{study}/series", base_url="http://127.0.0.1")
    series = series_rsp.get_json()[0]["0020000E"]["Value"][0]
    metadata = f"/dicom-web/studies/{study}/series/{series}/metadata"
    assert client.get(metadata, base_url="http://127.0.0.1").status_code == 200
    assert client.get("/dicom-web/system", base_url="http://127.0.0.1").status_code == 404
    trail.close()
    docs = [etree.fromstring(x) for x in audit_file.read_bytes().splitlines()]
    for doc in docs:
        assert schema.validate(doc), schema.error_log
    events = [
        (d.find("EventIdentification/EventID").get("csd-code"),
         [t.get("csd-code") for t in d.findall("EventIdentification/EventTypeCode")])
        for d in docs
    ]  # fmt: skip
    assert events == [("110103", []), ("110113", ["110132"])]
    assert docs[0].find("ParticipantObjectIdentification").get("ParticipantObjectID") == study
