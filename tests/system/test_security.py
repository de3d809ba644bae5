"""Who may talk to the node, over what, and what it keeps to itself.

Access control (calling/called AE title, source address), DICOM TLS against DCMTK's TLS
tools with a throwaway CA made by the ``openssl`` CLI, the association limit, the free-disk
watermark, spool permissions and patient identifiers in logs. Every peer is real: the node
runs as ``dicom-node serve``; the clients are DCMTK and pynetdicom.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.common.tls import (
    TLSConfigError,
    client_ssl_context,
    client_tls_args,
    server_ssl_context,
)
from dicom_node.config import ConfigError, TLSSettings
from dicom_node.intake.connections import address_allowed, allowed_networks
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import ROOT, NodeProcess, associate, dcmtk, storescu

pytestmark = [pytest.mark.usefixtures("dcmtk_tools"), pytest.mark.cost(45)]


# -- helpers ------------------------------------------------------------------------------
def _series(out: Path, n: int = 3, **attrs: str) -> list[Path]:
    hu = np.random.default_rng(7).integers(-1000, 1000, (n, 16, 16)).astype(np.int16)
    return write_ct_series(hu, out, spacing=(2.0, 1.0, 1.0), attrs=SeriesAttributes(**attrs))


def _ae(calling: str = "PYNETDICOM") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae


def _associate(port: int, calling: str = "PYNETDICOM", called: str = "DICOM_NODE", tls_args=None):
    return _ae(calling).associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def _rejection(
    port: int, calling: str = "PYNETDICOM", called: str = "DICOM_NODE"
) -> tuple[int, int, int] | None:
    """The (result, source, reason) of the node's A-ASSOCIATE-RJ to an association request
    (``None``: it did not reject it)."""
    assoc, rejection = associate(_ae(calling), port, ae_title=called)
    if assoc.is_established:
        assoc.release()
    return rejection


def _echo(port: int, *extra: str, calling: str = "ECHOSCU", called: str = "DICOM_NODE"):
    return dcmtk(
        "echoscu", "-aet", calling, "-aec", called, "-to", "10", *extra, "127.0.0.1", str(port)
    )


def _spool_files(node: NodeProcess) -> list[Path]:
    return sorted((node.data_dir / "spool").glob("*/*/*.dcm"))


def _log_text(node: NodeProcess) -> str:
    """Everything the node wrote: its stdout/stderr and its rotating log files."""
    parts = [node.log.read_text(errors="replace")]
    parts += [p.read_text(errors="replace") for p in (node.data_dir / "logs").glob("node.log*")]
    return "\n".join(parts)


@pytest.fixture
def started(tmp_path):
    """Start NodeProcesses that are stopped after the test, whatever happens."""
    nodes: list[NodeProcess] = []

    def start(name: str, **overrides) -> NodeProcess:
        # no test here runs a model: the threshold backend spares each node loading one
        overrides.setdefault("command", "dicom_node_testing.cli")
        overrides.setdefault("inference", {"backend": "threshold"})
        node = NodeProcess(tmp_path / name, **overrides).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


# -- access control -----------------------------------------------------------------------
def test_calling_and_called_ae_titles_are_checked(started):
    node = started("n", node={"allowed_calling_aes": ["SCANNER1", "SCANNER2"]})

    r = _echo(node.port, calling="INTRUDER")
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr
    assert "Rejected Permanent, Source: Service User" in r.stderr
    assert "Calling AE Title Not Recognized" in r.stderr

    r = _echo(node.port, calling="SCANNER2", called="OTHER_NODE")
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stderr

    assert _echo(node.port, calling="SCANNER1").returncode == 0

    # the same, as pynetdicom sees the A-ASSOCIATE-RJ: (result, source, reason)
    assert _rejection(node.port, calling="INTRUDER") == (1, 1, 3)
    assert _rejection(node.port, calling="SCANNER1", called="NOT_US") == (1, 1, 7)

    log = _log_text(node)
    assert "Calling AE title not recognised; 'INTRUDER'" in log
    assert "Called AE title not recognised; 'SCANNER2' calling 'OTHER_NODE'" in log
    assert node.jobs() == []


def test_source_address_is_checked(started):
    outside = started("outside", node={"allowed_hosts": ["192.0.2.0/24", "2001:db8::/32"]})
    r = _echo(outside.port)
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr
    assert "Rejected Permanent, Source: Service User" in r.stderr
    assert "Reason: No Reason" in r.stderr
    assert _rejection(outside.port) == (1, 1, 1)
    assert "source address 127.0.0.1 is not in node.allowed_hosts" in _log_text(outside)

    inside = started("inside", node={"allowed_hosts": ["10.1.2.3", "127.0.0.0/8"]})
    assert _echo(inside.port).returncode == 0


def test_allowed_hosts_matching_and_config_errors(tmp_path):
    nets = allowed_networks(["10.0.0.0/8", "192.168.1.7", "fd00::/8"])
    assert address_allowed("10.200.3.4", nets)
    assert address_allowed("::ffff:10.1.1.1", nets)  # IPv4 peer on a dual-stack socket
    assert address_allowed("192.168.1.7", nets)
    assert address_allowed("fd12::1", nets)
    assert not address_allowed("192.168.1.8", nets)
    assert not address_allowed("11.0.0.1", nets)
    assert not address_allowed("not-an-address", nets)
    assert address_allowed("203.0.113.9", [])  # none configured: everyone
    with pytest.raises(ConfigError, match=r"node.allowed_hosts\[1\]: 'pacs.example.org'"):
        allowed_networks(["10.0.0.1", "pacs.example.org"])

    # the node refuses to start on such a config, with one sentence and status 2
    node = NodeProcess(tmp_path / "bad", node={"allowed_hosts": ["pacs.example.org"]})
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(node.config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "dicom-node: node.allowed_hosts[0]: 'pacs.example.org' is not an IP address or network"
    )


def _until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _first_established(port: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assoc = _associate(port)
        if assoc.is_established:
            return assoc
        time.sleep(0.2)
    pytest.fail(f"no association slot came free in {timeout} s")


def test_association_limit_rejects_transient(started):
    node = started("n", limits={"max_associations": 1, "acse_timeout": 1.0})
    # A slot is taken by an association request and given back when the association ends.
    held = _first_established(node.port)
    try:
        r = _echo(node.port)
        assert r.returncode != 0
        assert "Association Rejected" in r.stderr
        assert (
            "Result: Rejected Transient, Source: Service Provider (Presentation Related)"
            in r.stderr
        )
        assert "Reason: Local Limit Exceeded" in r.stderr
        assert _rejection(node.port) == (2, 3, 2)
        assert held.send_c_echo().Status == 0  # the held association still works
    finally:
        held.release()
    assert _until(lambda: _echo(node.port).returncode == 0)
    # a peer that connects and says nothing holds no slot, and is hung up on after
    # acse_timeout
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        assert _rejection(node.port) is None
        silent.settimeout(30)
        assert silent.recv(1) == b""  # the node hung up on it
    assert _until(lambda: _echo(node.port).returncode == 0)
    assert "local limit exceeded" in _log_text(node).lower()


# -- DICOM TLS ----------------------------------------------------------------------------
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    return key, cert


def _issue(d: Path, ca: tuple[Path, Path], name: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (d / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={name}",
    )
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[1]),
        "-CAkey",
        str(ca[0]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A throwaway CA with a node and a client certificate, and a client of another CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca(d, "test-ca")
    rogue_ca = _make_ca(d, "rogue-ca")
    return {
        "ca": ca,
        "node": _issue(d, ca, "dicom-node"),
        "client": _issue(d, ca, "scanner-1"),
        "rogue": _issue(d, rogue_ca, "rogue-scanner"),
    }


@pytest.fixture
def tls_node(started, pki):
    return started(
        "tls",
        tls={
            "enabled": True,
            "certificate": str(pki["node"][1]),
            "private_key": str(pki["node"][0]),
            "ca_certificates": str(pki["ca"][1]),
            "require_client_certificate": True,
        },
        limits={"network_timeout": 5.0, "acse_timeout": 5.0},
    )


def _dcmtk_tls(pki, who: str = "client") -> list[str]:
    key, cert = pki[who]
    return ["+tls", str(key), str(cert), "+cf", str(pki["ca"][1])]


def test_tls_echo_and_store_with_dcmtk(tls_node, pki, tmp_path):
    # a silent TCP peer on the TLS port must not hold up the others
    with socket.create_connection(("127.0.0.1", tls_node.port)):
        r = _echo(tls_node.port, *_dcmtk_tls(pki))
        assert r.returncode == 0, r.stderr
    paths = _series(tmp_path / "s")
    r = storescu(tls_node.port, paths, "DICOM_NODE", "STORESCU", *_dcmtk_tls(pki))
    assert r.returncode == 0, r.stderr
    jobs = tls_node.jobs()
    assert [j["instance_count"] for j in jobs] == [3]
    stored = {str(pydicom.dcmread(p).SOPInstanceUID) for p in _spool_files(tls_node)}
    assert stored == {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    assert "TLS peer 127.0.0.1 presents certificate 'scanner-1'" in _log_text(tls_node)


def test_tls_refuses_peers_without_a_trusted_certificate(tls_node, pki, tmp_path):
    paths = _series(tmp_path / "s")
    # no client certificate
    r = dcmtk(
        "echoscu",
        "-aec",
        "DICOM_NODE",
        "-to",
        "10",
        "+tla",
        "+cf",
        str(pki["ca"][1]),
        "127.0.0.1",
        str(tls_node.port),
    )
    assert r.returncode != 0
    # a certificate from another CA
    r = storescu(tls_node.port, paths, "DICOM_NODE", "STORESCU", *_dcmtk_tls(pki, "rogue"))
    assert r.returncode != 0
    # plain DICOM on the TLS port
    r = storescu(tls_node.port, paths)
    assert r.returncode != 0
    assert "Association Request Failed" in r.stderr
    assert _spool_files(tls_node) == []
    assert tls_node.jobs() == []
    log = _log_text(tls_node)
    assert "refused: PEER_DID_NOT_RETURN_A_CERTIFICATE" in log
    assert "refused: CERTIFICATE_VERIFY_FAILED" in log or "refused: TLSV1_ALERT_UNKNOWN_CA" in log
    assert "refused: WRONG_VERSION_NUMBER" in log
    # ... and the node still serves TLS peers
    assert _echo(tls_node.port, *_dcmtk_tls(pki)).returncode == 0


def test_client_ssl_context_talks_to_the_tls_node(tls_node, pki):
    """The context exports use: verifies the node's certificate, presents the node's own."""
    settings = TLSSettings(
        enabled=True,
        certificate=pki["client"][1],
        private_key=pki["client"][0],
        ca_certificates=pki["ca"][1],
    )
    args = client_tls_args(settings, "127.0.0.1", enabled=True)
    assert args is not None and args[1] == "127.0.0.1"
    assoc = _associate(tls_node.port, tls_args=args)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert client_tls_args(settings, "127.0.0.1", enabled=False) is None

    # a node certificate that does not chain to the configured CA is not trusted
    distrust = TLSSettings(enabled=True, ca_certificates=pki["rogue"][1])
    assoc = _associate(tls_node.port, tls_args=(client_ssl_context(distrust), "127.0.0.1"))
    assert not assoc.is_established


def test_tls_handshake_deadline_and_address_limit(started, pki):
    """A ClientHello trickled a byte at a time is cut at association_deadline_seconds; while
    it holds its address's one connection, that address is refused and another served."""
    node = started(
        "tls-pressure",
        tls={
            "enabled": True,
            "certificate": str(pki["node"][1]),
            "private_key": str(pki["node"][0]),
            "ca_certificates": str(pki["ca"][1]),
            "require_client_certificate": True,
        },
        limits={
            "network_timeout": 5.0,
            "acse_timeout": 5.0,
            "association_deadline_seconds": 3.0,
            "max_associations_per_address": 1,
        },
    )
    settings = TLSSettings(
        enabled=True,
        certificate=pki["client"][1],
        private_key=pki["client"][0],
        ca_certificates=pki["ca"][1],
    )
    args = client_tls_args(settings, "127.0.0.1")

    def tls_assoc(source: str):
        ae = AE(ae_title="PYNETDICOM")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        return ae.associate(
            "127.0.0.1", node.port, ae_title="DICOM_NODE", tls_args=args, bind_address=(source, 0)
        )

    def held() -> tuple[socket.socket, float]:
        """A connection from 127.0.0.1 the node admitted. The node may still count the
        connection its start-up check made from that address for a moment, and then refuses
        this one: on a TLS port the rejection waits up to a second for a handshake to carry
        it, then the connection closes. Connect again until one stays open longer."""
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
            at = time.monotonic()
            sock.sendall(b"\x16\x03\x01\x02\x00")  # a TLS record of 512 bytes announced...
            sock.settimeout(1.5)
            try:
                if sock.recv(1) == b"":
                    sock.close()
                    continue
            except TimeoutError:
                sock.settimeout(10)
                return sock, at
        raise AssertionError("the node never admitted a connection from 127.0.0.1")

    slow, started_at = held()
    with slow:
        refused = tls_assoc("127.0.0.1")  # the address's one connection is held
        assert not refused.is_established
        assert _until(lambda: "already holds 1 connection" in _log_text(node), 5)
        other = tls_assoc("127.0.0.2")
        assert other.is_established and other.send_c_echo().Status == 0
        other.release()
        closed = None
        while time.monotonic() - started_at < 8:  # ...and trickled
            try:
                slow.sendall(b"\x00")
            except OSError:
                closed = time.monotonic() - started_at
                break
            time.sleep(0.25)
    assert closed is not None and closed < 5, closed
    assert "TLS handshake not complete within 3 s" in _log_text(node)
    assert _until(lambda: (a := tls_assoc("127.0.0.1")).is_established and a.release() is None, 5)


def test_tls_settings_errors_are_one_sentence(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match=r"tls.certificate: .*nope.pem does not exist"):
        server_ssl_context(
            TLSSettings(enabled=True, certificate=missing, private_key=pki["node"][0])
        )
    with pytest.raises(TLSConfigError, match="cannot be loaded together"):
        server_ssl_context(
            TLSSettings(enabled=True, certificate=pki["node"][1], private_key=pki["client"][0])
        )
    with pytest.raises(TLSConfigError, match="require_client_certificate needs"):
        server_ssl_context(
            TLSSettings(
                enabled=True,
                certificate=pki["node"][1],
                private_key=pki["node"][0],
                require_client_certificate=True,
            )
        )
    ctx = server_ssl_context(
        TLSSettings(
            enabled=True,
            certificate=pki["node"][1],
            private_key=pki["node"][0],
            ca_certificates=pki["ca"][1],
        )
    )
    import ssl

    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# -- limits and storage -------------------------------------------------------------------
def _store_all(port: int, paths: list[Path]) -> list[int]:
    assoc = _associate(port)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def test_free_disk_watermark_refuses_and_writes_nothing(tmp_path):
    paths = _series(tmp_path / "s")
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    node = NodeProcess(
        tmp_path / "n",
        command="dicom_node_testing.cli",
        inference={"backend": "threshold"},
        node={"min_free_disk_mb": free_mb + 10_000},
    ).start()
    try:
        assert _store_all(node.port, paths) == [0xA700] * 3
        assert _spool_files(node) == []
        assert list((node.data_dir / "spool" / ".incoming").iterdir()) == []
        assert node.jobs() == []
        assert "below the" in _log_text(node)
    finally:
        node.stop()
    # the same node, with a sane watermark, accepts again
    node.write_config(node={"min_free_disk_mb": 1}, inference={"backend": "threshold"})
    node.start()
    try:
        assert _store_all(node.port, paths) == [0] * 3
        assert [j["instance_count"] for j in node.jobs()] == [3]
    finally:
        node.stop()


def test_spool_is_private_to_the_node_user(started, tmp_path):
    node = started("n", node={"settle_seconds": 3600, "complete_on_release": False})
    assert _store_all(node.port, _series(tmp_path / "s")) == [0] * 3
    spool = node.data_dir / "spool"
    entries = [spool, *spool.rglob("*")]
    files = [p for p in entries if p.is_file()]
    dirs = [p for p in entries if p.is_dir()]
    assert len(files) == 3 and len(dirs) == 4  # spool, .incoming, study, series
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for p in dirs:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    assert all(p.stat().st_uid == os.getuid() for p in entries)


def test_no_patient_identifiers_in_logs(started, tmp_path):
    tag = uuid.uuid4().hex[:10].upper()
    name, pid = f"Zqx{tag}^Vrk{tag}", f"PID{tag}"
    paths = _series(tmp_path / "s", n=2, patient_name=name, patient_id=pid)
    # an instance that is refused, so the refusal path logs too
    bad = pydicom.dcmread(paths[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    bad.Modality = "MR"
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    for flag in (False, True):
        node = started(f"n{flag}", node={"settle_seconds": 0.3, "log_patient_identifiers": flag})
        statuses = _store_all(node.port, [*paths, tmp_path / "bad.dcm"])
        assert statuses == [0, 0, 0xA900]
        # two slices are too few: the job fails at assembly, and that is logged as well
        node.wait_for(lambda js: js and js[0]["state"] == "failed", 60, "failed job")
        node.stop()
        log = _log_text(node)
        assert "failed: not a volume" in log
        for secret in (tag, name, pid):
            assert (secret in log) == flag, (flag, secret)


# -- status pages beyond loopback ---------------------------------------------------------
def test_status_pages_beyond_loopback_without_credentials_refuse_to_start(tmp_path):
    """``dicom-node serve`` (and validate-config) with the status service on 0.0.0.0 and no
    credentials: exit status 2, one sentence, nothing listening; with a token file the node
    starts and its pages ask for the token."""
    import urllib.error
    import urllib.request

    from tests.peers import free_port

    status_port = free_port()
    node = NodeProcess(
        tmp_path / "exposed", status={"enabled": True, "host": "0.0.0.0", "port": status_port}
    )
    for command in ("serve", "validate-config"):
        args = ["--config", str(node.config)] if command == "serve" else [str(node.config)]
        r = subprocess.run(
            [sys.executable, "-m", "dicom_node", command, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert r.returncode == 2, (command, r.stderr)
        assert "status.host: 0.0.0.0 is reachable beyond this machine" in r.stderr
        assert "set status.auth" in r.stderr
        assert "Traceback" not in r.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", node.port)) != 0  # the SCP never started

    token = tmp_path / "status.token"
    token.write_text("b7c1e0d2\n")
    token.chmod(0o600)
    node.write_config(
        status={
            "enabled": True,
            "host": "0.0.0.0",
            "port": status_port,
            "auth": "bearer",
            "credentials_file": str(token),
        }
    )
    node.start()
    try:
        url = f"http://127.0.0.1:{status_port}/"
        deadline = time.time() + 30
        code = None
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url, timeout=10)
                code = 200
            except urllib.error.HTTPError as exc:
                code = exc.code
            except OSError:
                time.sleep(0.2)
                continue
            break
        assert code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer b7c1e0d2"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
    finally:
        node.stop()
