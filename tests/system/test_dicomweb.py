"""STOW-RS export against Orthanc's DICOMweb plugin: the outbox's rules over HTTP.

Orthanc logs every instance it receives (a Lua filter, duplicates included), so "exactly
once" is counted where the objects arrive.
"""

from __future__ import annotations

import io
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import ConfigError, ResultSettings, Settings, load_settings
from dicom_node.export.dicomweb import DicomWebDestination
from dicom_node.export.sender import Exporter
from dicom_node.export.transport import LABEL_MAP_SEG
from dicom_node.state import JobDatabase, NewOutboxItem
from tests.peers import Orthanc
from tests.system.test_export import labelmap_results, queue_labelmap_results

pytestmark = pytest.mark.cost(15)


def _web(url: str, **kw) -> DicomWebDestination:
    return DicomWebDestination(
        name="web",
        url=url,
        attempts=10,
        retry_backoff_seconds=0.2,
        max_backoff_seconds=0.2,
        **kw,
    )


def _send_all(exporter: Exporter, jobs: JobDatabase, series: str, timeout: float = 20.0) -> int:
    """Run the export loop until every item of the series is sent; return how many passes
    acknowledged something."""
    deadline = time.time() + timeout
    sent = 0
    while time.time() < deadline:
        sent += exporter.run_once()
        if all(i.state == "sent" for i in jobs.outbox.items(series)):
            return sent
        time.sleep(0.1)
    raise AssertionError(
        f"not all sent: {[(i.kind, i.last_error) for i in jobs.outbox.items(series)]}"
    )


def test_stow_while_the_server_is_down_then_back_delivers_each_object_once(tmp_path):
    _, files = labelmap_results(tmp_path)
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, count_deliveries=True)
    settings = Settings(
        results=ResultSettings(seg_type="labelmap"), destinations=[_web(pacs.dicomweb_url)]
    )
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    queue_labelmap_results(jobs, settings, files, "2.1")
    exporter = Exporter(settings, jobs)

    # down: every item waits with what happened, nothing is lost
    assert exporter.run_once() == 0
    items = jobs.outbox.items("2.1")
    assert [i.state for i in items] == ["pending"] * 3
    assert all(i.attempts == 1 for i in items)
    assert all(f"web ({pacs.dicomweb_url}) cannot be reached" in i.last_error for i in items)

    pacs.start()
    try:
        assert _send_all(exporter, jobs, "2.1") == 3
        for _ in range(3):  # nothing is sent twice, however often the exporter runs
            assert exporter.run_once() == 0
        # nor by a restarted node
        jobs.close()
        exporter.journal.close()
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        restarted = Exporter(settings, jobs)
        assert restarted.run_once() == 0
        restarted.journal.close()

        # Orthanc's DICOMweb takes the Label Map class: the label map went, and its SR
        sent = {i.kind: (i.sent_as, i.sop_uid) for i in jobs.outbox.items("2.1")}
        assert sent["SEG"] == ("labelmap", files["SEG"]["sop_uid"])
        assert sent["SR"] == ("labelmap", files["SR"]["sop_uid"])
        expected = {files[k]["sop_uid"] for k in ("SEG", "RTSTRUCT", "SR")}
        assert pacs.deliveries() == {uid: 1 for uid in expected}
        stored = {
            str(pydicom.dcmread(io.BytesIO(pacs.file(iid))).SOPClassUID)
            for iid in pacs.rest("/instances")
        }
        assert LABEL_MAP_SEG in stored and len(stored) == 3
    finally:
        pacs.stop()


def test_wrong_credentials_are_a_clear_error_and_nothing_is_lost(tmp_path):
    """Orthanc with HTTP authentication: wrong basic credentials are refused (HTTP 401),
    the outbox says so and keeps the items; once the file is corrected the next retry
    delivers each object once."""
    _, files = labelmap_results(tmp_path)
    pacs = Orthanc(
        tmp_path / "orthanc",
        dicomweb=True,
        count_deliveries=True,
        config={"AuthenticationEnabled": True, "RegisteredUsers": {"node": "s3cret"}},
        rest_auth=("node", "s3cret"),
    ).start()
    try:
        secret = tmp_path / "pacs.secret"
        secret.write_text("node:Xq7-not-it\n")
        settings = Settings(
            destinations=[_web(pacs.dicomweb_url, auth="basic", credentials_file=secret)]
        )
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        for kind in ("SEG_BINARY", "RTSTRUCT"):
            jobs.outbox.enqueue(
                NewOutboxItem(
                    series_uid="2.2",
                    kind=kind.split("_")[0],
                    destination="web",
                    path=str(files[kind]["path"]),
                    sop_uid=files[kind]["sop_uid"],
                )
            )
        exporter = Exporter(settings, jobs)
        assert exporter.run_once() == 0
        items = jobs.outbox.items("2.2")
        assert [i.state for i in items] == ["pending", "pending"]
        for item in items:
            assert "web answered HTTP 401 Unauthorized" in item.last_error
            assert f"basic credentials from credentials_file {secret} were refused" in (
                item.last_error
            )
            assert "Xq7-not-it" not in item.last_error  # the secret is never recorded
        assert pacs.rest("/instances") == []

        secret.write_text("node:s3cret\n")  # corrected: read again at the next attempt
        assert _send_all(exporter, jobs, "2.2") == 2
        assert exporter.run_once() == 0
        assert pacs.deliveries() == {files[k]["sop_uid"]: 1 for k in ("SEG_BINARY", "RTSTRUCT")}
    finally:
        pacs.stop()


def test_a_missing_credentials_file_refuses_start_in_one_sentence(tmp_path):
    dest = _web("https://pacs.example/dicom-web", auth="bearer", credentials_env="NO_SUCH_VAR")
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    with pytest.raises(ConfigError, match="destination web.credentials_env: the variable "):
        Exporter(Settings(destinations=[dest]), jobs)
    config = tmp_path / "node.toml"
    config.write_text(
        '[[destinations]]\nname = "web"\ntype = "dicomweb"\n'
        'url = "http://pacs.example/dicom-web"\nauth = "basic"\n'
        'credentials_file = "/etc/x"\n'
    )
    with pytest.raises(ConfigError, match="clear text; use https://"):
        load_settings(config)
    config.write_text('[[destinations]]\nname = "web"\ntype = "dicomweb"\nauth = "basic"\n')
    with pytest.raises(ConfigError, match="url: '' is not an http"):
        load_settings(config)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _server_certificate(d: Path) -> tuple[Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1, with its key, in one PEM (as
    Orthanc's SslCertificate wants it). Returns (CA certificate, server PEM)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=test CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(d / "srv.key"), "-out", str(d / "srv.csr"))  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(d / "ext.cnf"), "-out", str(d / "srv.pem"))  # fmt: skip
    both = d / "orthanc.pem"
    both.write_text((d / "srv.pem").read_text() + (d / "srv.key").read_text())
    return d / "ca.pem", both


class _TLSFront:
    """TLS in front of Orthanc's HTTP port: accepts TLS with ``pem`` and relays the bytes.

    Debian's Orthanc 1.10 serves HTTPS itself (SslEnabled) but dies with SIGSEGV on the
    first HTTPS request on this system, so the TLS endpoint is this relay, written out
    here rather than adding a proxy package for one test. Orthanc still answers.
    """

    def __init__(self, pem: Path, backend_port: int) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pem)
        self.backend = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):  # the client refused our certificate
            raw.close()
            return
        backend = socket.create_connection(("127.0.0.1", self.backend))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(backend, client), daemon=True).start()
        pump(client, backend)

    def close(self) -> None:
        self.listener.close()


def test_https_certificates_are_verified(tmp_path):
    """Over https the server's certificate must chain to the configured CA: against the
    default CAs a private CA's certificate is refused, with that reason, and nothing is
    lost; with ``ca_certificates`` the object is delivered."""
    _, files = labelmap_results(tmp_path)
    ca, pem = _server_certificate(tmp_path)
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, count_deliveries=True).start()
    front = _TLSFront(pem, pacs.http_port)
    try:
        url = f"https://127.0.0.1:{front.port}/dicom-web"
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        path, uid = files["RTSTRUCT"]["path"], files["RTSTRUCT"]["sop_uid"]
        jobs.outbox.enqueue(NewOutboxItem(series_uid="2.3", kind="RTSTRUCT", destination="web", path=str(path),
                            sop_uid=uid))  # fmt: skip
        assert Exporter(Settings(destinations=[_web(url)]), jobs).run_once() == 0
        (item,) = jobs.outbox.items("2.3")
        assert item.state == "pending"
        assert "TLS failed, the server's certificate was not verified" in item.last_error
        assert "CERTIFICATE_VERIFY_FAILED" in item.last_error
        assert pacs.deliveries() == {}

        trusted = Exporter(Settings(destinations=[_web(url, ca_certificates=ca)]), jobs)
        assert _send_all(trusted, jobs, "2.3") == 1
        assert pacs.deliveries() == {uid: 1}
    finally:
        front.close()
        pacs.stop()
