"""The PACS and viewer the node starts itself: Orthanc with DICOMweb, and OHIF in front.

A destination with ``embedded = true`` (the default configuration's only one) is not a
peer somebody else runs: the node starts Debian's Orthanc as a child process on loopback,
listening with that destination's AE title and port, with the DICOMweb plugin and its own
storage under ``data_dir/orthanc``, and supervises it like the Triton server it manages
(restarted with backoff when it exits, stopped with the node, and killed by the kernel if
the node dies first). Results reach it through the ordinary outbox, by C-STORE; the CT
each job reads is posted to it once the series is complete, so that the viewer shows the
results over their images.

The viewer (:mod:`dicom_node.service.viewer`) serves OHIF in front of it on one origin.
A configuration without an embedded destination starts none of this.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_node.common.backoff import backoff
from dicom_node.config import Settings
from dicom_node.export.dimse import DicomDestination
from dicom_node.service.audit import AuditTrail
from dicom_node.service.supervisor import ChildProcess, Supervisor, SupervisorError
from dicom_node.service.viewer import viewer_app
from dicom_node.service.web import WebServer, WebServerError

log = logging.getLogger("dicom_node.service.embedded")

__all__ = ["Embedded", "EmbeddedError", "embedded_destination", "orthanc_config"]


class EmbeddedError(RuntimeError):
    """The embedded PACS or viewer cannot start; the message says why, in one sentence."""


def embedded_destination(settings: Settings) -> DicomDestination | None:
    """The destination the node runs itself, or ``None`` when results go elsewhere."""
    return next(
        (d for d in settings.destinations if isinstance(d, DicomDestination) and d.embedded),
        None,
    )


def orthanc_config(settings: Settings, destination: DicomDestination) -> dict:
    """Orthanc's JSON configuration for the embedded PACS.

    Orthanc 1.10 has no setting for the address it listens on (its configuration, as
    ``Orthanc --config`` prints it, has none: HTTP goes to CivetWeb on ``HttpPort``, DICOM
    to DCMTK on ``DicomPort``, both on every interface). So both ports refuse other hosts
    themselves: HTTP refuses any client but 127.0.0.1 (``RemoteAccessAllowed`` off: it
    answers 401), and DICOM serves only the node's own AE title from 127.0.0.1, for every service
    (``DicomAlwaysAllow*`` off, the modality's host checked); an echo from anyone else is
    refused too. Lua scripts from the REST API and writing files through it stay off.
    """
    storage = settings.node.data_dir / "orthanc"
    node = settings.node
    return {
        "Name": "dicom-node",
        "StorageDirectory": str(storage / "storage"),
        "IndexDirectory": str(storage / "storage"),
        "DicomAet": destination.ae_title,
        "DicomPort": destination.port,
        "HttpPort": settings.embedded.orthanc_http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "HttpDescribeErrors": False,
        "DicomModalities": {"dicom-node": [node.ae_title, "127.0.0.1", node.port]},
        "Plugins": [str(settings.embedded.dicomweb_plugin)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
        "SaveJobs": False,
    }


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Orthanc:
    """Orthanc as a supervised child (:mod:`dicom_node.service.supervisor`): started,
    restarted when it exits, stopped with the node, and ended by the kernel if the node
    dies first."""

    def __init__(self, settings: Settings, destination: DicomDestination) -> None:
        self.settings = settings
        self.destination = destination
        self.workdir = settings.node.data_dir / "orthanc"
        self.log_path = settings.node.data_dir / "logs" / "orthanc.log"
        self._supervisor: Supervisor | None = None

    def start(self) -> None:
        e = self.settings.embedded
        executable = shutil.which(e.orthanc_executable) or (
            "/usr/sbin/Orthanc" if e.orthanc_executable == "Orthanc" else ""
        )
        if not executable or not Path(executable).exists():
            raise EmbeddedError(
                f"the embedded PACS needs Orthanc ({e.orthanc_executable!r} is not installed; "
                "make install installs Debian's orthanc)"
            )
        if not e.dicomweb_plugin.exists():
            raise EmbeddedError(
                f"the embedded PACS needs Orthanc's DICOMweb plugin at {e.dicomweb_plugin} "
                "(make install installs Debian's orthanc-dicomweb)"
            )
        ports = (self.destination.port, e.orthanc_http_port)
        for port in ports:
            if _listening(port):
                raise EmbeddedError(
                    f"port {port} of the embedded PACS is taken by another program; set "
                    "the embedded destination's port or [embedded] orthanc_http_port"
                )
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True, mode=0o700)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(orthanc_config(self.settings, self.destination), indent=2))
        child = ChildProcess(
            [executable, str(config)],
            self.log_path,
            # Debian's DCMTK-based receivers stall ~40 ms per message without TCP_NODELAY.
            env=dict(os.environ, TCP_NODELAY="1"),
            die_with_parent=True,
        )
        self._supervisor = Supervisor(
            "the embedded Orthanc",
            child,
            ready=lambda: all(_listening(p) for p in ports),
            startup_timeout=e.startup_timeout_seconds,
        )
        try:
            self._supervisor.start()
        except SupervisorError as exc:
            self._supervisor = None
            raise EmbeddedError(str(exc)) from None
        log.info(
            "embedded PACS: Orthanc %s on 127.0.0.1:%d (HTTP %d), data in %s",
            self.destination.ae_title,
            self.destination.port,
            e.orthanc_http_port,
            self.workdir,
        )

    def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None


class _Archiver:
    """Posts the CT of each completed series to the embedded Orthanc (its REST API, on
    loopback), off the job's path, so that the viewer shows the results over their
    images. Orthanc keeps an instance once, so a series posted twice costs nothing."""

    def __init__(self, http_port: int) -> None:
        self.http_port = http_port
        self._queue: queue.Queue[list[Path] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="dicom-node-archive", daemon=True)
        self._thread.start()

    def put(self, paths: Sequence[Path]) -> None:
        self._idle.clear()
        self._queue.put(list(paths))

    def _run(self) -> None:
        while (paths := self._queue.get()) is not None:
            failed = 0
            for path in paths:
                failed += not self._post(path)
            if failed:
                log.warning("embedded PACS: %d of %d instance(s) not stored", failed, len(paths))
            if self._queue.empty():
                self._idle.set()

    def _post(self, path: Path) -> bool:
        for attempt in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
            try:
                conn.request(
                    "POST",
                    "/instances",
                    body=path.read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    return True
                reason = f"HTTP {resp.status}"
            except OSError as exc:
                reason = str(exc)
            finally:
                conn.close()
            if attempt < 2:
                time.sleep(backoff(attempt + 1, 1.0, 2.0))  # Orthanc restarting: retry shortly
        log.warning("embedded PACS: %s not stored: %s", path.name, reason)
        return False

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)


class Embedded:
    """The embedded PACS and viewer of one node: :meth:`start`, :meth:`stop`, and
    :meth:`archive` for the CT of a series."""

    def __init__(
        self, settings: Settings, destination: DicomDestination, audit: AuditTrail | None = None
    ) -> None:
        self.settings = settings
        self.destination = destination
        self.audit = audit
        self._orthanc = _Orthanc(settings, destination)
        self._server: object | None = None
        self._archiver: _Archiver | None = None
        self.viewer_url = ""

    def start(self) -> None:
        """Start Orthanc, then the viewer; raise :class:`EmbeddedError` saying why not."""
        e = self.settings.embedded
        if not (e.viewer_dir / "index.html").is_file():
            raise EmbeddedError(
                f"the viewer is not installed in {e.viewer_dir} (make install unpacks OHIF "
                "there from npm)"
            )
        self._orthanc.start()
        self._archiver = _Archiver(e.orthanc_http_port)
        try:
            server = WebServer(
                viewer_app(
                    e.viewer_dir, e.orthanc_http_port, hosts=(e.viewer_host,), audit=self.audit
                ),
                e.viewer_host,
                e.viewer_port,
                threads=8,  # OHIF fetches metadata and frames in parallel
                name="viewer",
            )
        except WebServerError as exc:
            self.stop()
            raise EmbeddedError(str(exc)) from None
        server.start()
        self._server = server
        self.viewer_url = server.url

    def archive(self, paths: Sequence[Path]) -> None:
        """Store these instances in the embedded PACS, in the background."""
        if self._archiver is not None:
            self._archiver.put(paths)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None
        if self._archiver is not None:
            self._archiver.close()
            self._archiver = None
        self._orthanc.stop()
