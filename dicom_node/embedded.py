"""The PACS and viewer the node starts itself: Orthanc with DICOMweb, and OHIF in front.

A destination with ``embedded = true`` (the default configuration's only one) is not a
peer somebody else runs: the node starts Debian's Orthanc as a child process on loopback,
listening with that destination's AE title and port, with the DICOMweb plugin and its own
storage under ``data_dir/orthanc``, and supervises it like the Triton server it manages
(restarted with backoff when it exits, stopped with the node, and killed by the kernel if
the node dies first). Results reach it through the ordinary outbox, by C-STORE; the CT
each job reads is posted to it once the series is complete, so that the viewer shows the
results over their images.

The viewer is the prebuilt OHIF ``dist/`` that ``make install`` unpacks from the pinned npm
package. OHIF is a single-page application: any path it routes on the client (``/viewer``,
``/segmentation``...) must return its ``index.html``, and its DICOMweb client expects the
server on the same origin. Orthanc's ServeFolders plugin can do neither, so a small WSGI
application here serves the files (``index.html`` for any path that is not one),
``app-config.js`` written for this origin, and forwards ``/dicom-web/`` to Orthanc.
A configuration without an embedded destination starts none of this.

Why one module of this size: the embedded PACS and its viewer are one feature, started,
supervised and stopped together (Orthanc, the viewer's proxy, the CT archived for it).
"""

from __future__ import annotations

import ctypes
import http.client
import ipaddress
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

from flask import Flask, Response, request, send_from_directory

from dicom_node.audit import AuditTrail, StudyRef
from dicom_node.config import Destination, Settings

log = logging.getLogger("dicom_node.embedded")

__all__ = [
    "Embedded",
    "EmbeddedError",
    "embedded_destination",
    "orthanc_config",
    "viewer_app",
    "viewer_config_js",
    "viewer_link",
]

#: Headers that belong to one HTTP hop (RFC 9110 7.6.1): never forwarded, and WSGI forbids
#: an application to set them.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Request headers passed on to Orthanc. Host is kept so that the DICOMweb plugin writes
#: bulk data URIs that point back at the viewer's origin rather than at Orthanc's port.
_FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "Host", "Range")

#: Chunk size when streaming a DICOMweb response through.
_CHUNK = 256 * 1024

#: prctl option: the signal the kernel sends the child when the thread that forked it dies.
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """The embedded PACS or viewer cannot start; the message says why, in one sentence."""


def embedded_destination(settings: Settings) -> Destination | None:
    """The destination the node runs itself, or ``None`` when results go elsewhere."""
    return next((d for d in settings.destinations if d.embedded), None)


def viewer_link(viewer_url: str, study_uid: str, series_uid: str | None = None) -> str:
    """The OHIF URL that opens ``study_uid`` with ``series_uid`` (a SEG, RTSTRUCT or SR)
    shown in the viewport: OHIF 3's ``initialSeriesInstanceUID`` loads that series first
    and, for a derived object, overlays it on the images it references."""
    query = {"StudyInstanceUIDs": study_uid}
    if series_uid:
        query["initialSeriesInstanceUID"] = series_uid
    return f"{viewer_url.rstrip('/')}/viewer?{urllib.parse.urlencode(query)}"


def orthanc_config(settings: Settings, destination: Destination) -> dict:
    """Orthanc's JSON configuration for the embedded PACS.

    Orthanc 1.10 has no setting for the address it listens on (its configuration, as
    ``Orthanc --config`` prints it, has none: HTTP goes to CivetWeb on ``HttpPort``, DICOM
    to DCMTK on ``DicomPort``, both on every interface). So both ports refuse other hosts
    themselves: HTTP answers 403 to any client but 127.0.0.1 (``RemoteAccessAllowed``
    off), and DICOM serves only the node's own AE title from 127.0.0.1, for every service
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


def viewer_config_js() -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source on the page's own origin.

    ``disableConfirmationPrompts`` lets a SEG, RTSTRUCT or SR named in the URL load without
    a question, and the investigational-use notice is not shown on every visit.
    """
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "disableConfirmationPrompts": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "dicomweb",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "dicomweb",
                "configuration": {
                    "friendlyName": "dicom-node PACS (Orthanc)",
                    "name": "orthanc",
                    "wadoUriRoot": "@ORIGIN@/dicom-web",
                    "qidoRoot": "@ORIGIN@/dicom-web",
                    "wadoRoot": "@ORIGIN@/dicom-web",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "singlepart": "bulkdata,video",
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    text = json.dumps(config, indent=2).replace('"@ORIGIN@', 'window.location.origin + "')
    return f"window.config = {text};\n"


def viewer_app(
    viewer_dir: Path,
    orthanc_http_port: int,
    hosts: Sequence[str] = (),
    audit: AuditTrail | None = None,
) -> Flask:
    """The viewer's WSGI application: OHIF's files, its config, and the DICOMweb requests
    OHIF makes forwarded to Orthanc (:func:`dicomweb_target` says which).

    ``hosts`` are host names the viewer may be reached by besides IP addresses and
    ``localhost`` (a Host header naming anything else is refused: a page that rebinds its
    own name to this address would otherwise be "same origin").

    The forwarding is written here rather than taken from a library because it is one
    streamed request per call to a fixed loopback server, which ``http.client`` does in a
    few lines; the WSGI server is the waitress the status pages already use.

    With ``audit``, a study's or series' metadata read through the viewer is a DICOM
    Instances Accessed message (once per request for metadata, not per frame), and every
    refused request a Security Alert (Use of Restricted Function).
    """
    root = Path(viewer_dir).resolve()
    app = Flask(__name__, static_folder=None)
    config_js = viewer_config_js()
    names = {h.lower() for h in hosts} | {"localhost"}

    @app.get("/app-config.js")
    def app_config() -> Response:
        return Response(config_js, mimetype="application/javascript", headers=_NO_STORE)

    # Every method and path under /dicom-web reaches dicomweb(), which refuses what OHIF
    # does not send; Flask's own 405 would not say why.
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

    @app.route("/dicom-web", methods=methods, defaults={"rest": ""})
    @app.route("/dicom-web/<path:rest>", methods=methods)
    def dicomweb(rest: str) -> Response:
        refusal = _cross_origin(names)
        if refusal:
            log.warning("viewer: %s %s refused: %s", request.method, _shown_path(), refusal)
            if audit is not None:
                audit.on_restricted_request(request.remote_addr or "", _shown_path(), refusal)
            return Response(refusal + "\n", status=403, mimetype="text/plain")
        target = dicomweb_target(
            request.method,
            request.environ.get("REQUEST_URI") or request.full_path,
            request.path,
            request.mimetype,
        )
        if isinstance(target, _Refused):
            log.warning("viewer: %s %s refused: %s", request.method, _shown_path(), target.reason)
            if audit is not None:
                audit.on_restricted_request(request.remote_addr or "", _shown_path(), target.reason)
            return Response(target.reason + "\n", status=target.status, mimetype="text/plain")
        if audit is not None and (study := _metadata_study(request.path)):
            audit.on_access("(viewer)", request.remote_addr or "", request.path, [StudyRef(study)])
        return _forward(orthanc_http_port, target)

    @app.get("/", defaults={"path": ""})
    @app.get("/<path:path>")
    def files(path: str) -> Response:
        if path and (root / path).is_file():
            return send_from_directory(root, path)
        # a route of the single-page application: OHIF reads the path itself
        return send_from_directory(root, "index.html", max_age=0)

    return app


_NO_STORE = {"Cache-Control": "no-store"}


#: A UID as DICOMweb paths carry it (PS3.5 9.1: digits and dots, at most 64).
_UID = r"[0-9][0-9.]{0,63}"
#: The DICOMweb resources OHIF 3 reads (QIDO-RS searches, WADO-RS metadata, frames, bulk
#: data, rendered and thumbnail), relative to ``/dicom-web/``. Nothing else of Orthanc's
#: REST API is reachable through the viewer.
_READ_PATHS = re.compile(
    rf"""(?x)
    (studies|series|instances)
    | studies/{_UID}(/(metadata|rendered|thumbnail|series|instances))?
    | studies/{_UID}/series/{_UID}(/(metadata|rendered|thumbnail|instances))?
    | studies/{_UID}/series/{_UID}/instances/{_UID}(/(metadata|rendered|thumbnail))?
    | studies/{_UID}/series/{_UID}/instances/{_UID}/frames/[0-9]{{1,6}}(,[0-9]{{1,6}}){{0,999}}
        (/(rendered|thumbnail))?
    | studies/{_UID}/series/{_UID}/instances/{_UID}/bulk(/[0-9A-Fa-f]{{8}}(/[0-9]{{1,6}})?){{1,8}}
    """
)
#: STOW-RS (OHIF stores a report it makes): POST of multipart/related to these only.
_STORE_PATHS = re.compile(rf"studies(/{_UID})?")
_STOW_TYPE = "multipart/related"
#: What may not appear in a path, decoded once or as sent: dot segments, encoded slashes,
#: backslashes, a second level of percent-encoding, control characters.
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c|25|00)", re.IGNORECASE)


_METADATA = re.compile(rf"/dicom-web/studies/({_UID})(/series/{_UID})?/metadata")


def _metadata_study(path: str) -> str:
    """The study whose (or whose series') metadata ``path`` reads, or ``""``."""
    match = _METADATA.fullmatch(path)
    return match.group(1) if match else ""


class _Refused:
    """A request the proxy does not forward: the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


def _shown_path() -> str:
    """The request's path for a log line: escaped, bounded (it is the peer's text)."""
    raw = request.environ.get("REQUEST_URI") or request.path
    return raw[:200].encode("unicode_escape").decode("ascii")


def _cross_origin(names: set[str]) -> str:
    """Why the request is not from the viewer's own page ("" when it is).

    The Host header must name this server (an IP address, ``localhost``, or a configured
    name), and an Origin header, when the browser sends one, must be that same origin:
    a page elsewhere (``Sec-Fetch-Site: cross-site``, or its own Origin) reads nothing and
    changes nothing. Browsers send Origin with every POST, same-origin ones included, so
    a POST without one comes from no browser page.
    """
    host = request.host.lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if name not in names:
            return f"Host {host!r} is not this viewer's"
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/").lower() != f"{request.scheme}://{host}":
        return f"Origin {origin[:100]!r} is not this viewer's"
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return "a request from another site"
    if request.method == "POST" and origin is None:
        return "a POST without Origin"
    return ""


def dicomweb_target(method: str, raw_uri: str, path: str, mimetype: str = "") -> str | _Refused:
    """The Orthanc URL a viewer request is forwarded to, or why it is refused.

    ``raw_uri`` is the request line's target as sent, ``path`` the path as decoded once by
    the server. The path is checked in both forms: no ``.`` or ``..`` segment, no encoded
    dot, slash, backslash or percent sign (double encoding), no backslash, no control
    character; then it must be one of the DICOMweb resources OHIF uses (:data:`_READ_PATHS`
    for GET and HEAD, :data:`_STORE_PATHS` for a STOW-RS POST of multipart/related). The
    target is rebuilt from the checked segments, never passed on as received.
    """
    raw_path, _, query = raw_uri.partition("?")
    for form in (raw_path, path):
        segments = form.split("/")
        if any(seg in (".", "..") for seg in segments):
            return _Refused(400, "a dot segment in the path")
        if "\\" in form or any(ord(c) < 0x20 or ord(c) == 0x7F for c in form):
            return _Refused(400, "a backslash or control character in the path")
    if _ENCODED_SEPARATOR.search(raw_path) or "%" in path:
        return _Refused(400, "an encoded dot, slash, backslash or percent sign in the path")
    if not path.startswith("/dicom-web/"):
        return _Refused(404, "not a DICOMweb resource")
    rest = path[len("/dicom-web/") :]
    if method in ("GET", "HEAD"):
        if not _READ_PATHS.fullmatch(rest):
            return _Refused(404, "not a DICOMweb resource the viewer reads")
    elif method == "POST":
        if not _STORE_PATHS.fullmatch(rest):
            return _Refused(405, "POST is for STOW-RS to /studies only")
        if mimetype != _STOW_TYPE:
            return _Refused(415, f"STOW-RS takes {_STOW_TYPE}, not {mimetype or 'no type'}")
    else:
        return _Refused(405, f"{method} is not a method the viewer uses")
    target = "/dicom-web/" + rest
    if query:
        target += "?" + query
    return target


def _forward(port: int, target: str) -> Response:
    """Forward the current request to Orthanc (at ``target``, checked) and stream its
    answer back unchanged."""
    headers = {k: request.headers[k] for k in _FORWARDED_REQUEST_HEADERS if k in request.headers}
    body = request.get_data() if request.method == "POST" else None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(request.method, target, body=body, headers=headers)
        upstream = conn.getresponse()
    except OSError as exc:
        conn.close()
        return Response(f"the PACS does not answer: {exc}\n", status=502, mimetype="text/plain")

    def stream() -> Iterator[bytes]:
        try:
            while chunk := upstream.read(_CHUNK):
                yield chunk
        finally:
            conn.close()

    out = [(k, v) for k, v in upstream.getheaders() if k.lower() not in _HOP_BY_HOP]
    return Response(stream(), status=upstream.status, headers=out, direct_passthrough=True)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls into it


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Have the kernel SIGTERM this child when the thread that started it ends, so that a
    node killed outright leaves no Orthanc holding its ports."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    os.setpgrp()  # and a terminal's Ctrl-C reaches the node alone, which stops it in order


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Orthanc:
    """Orthanc as a supervised child process: started, restarted when it exits, stopped.

    The process is started from the supervising thread, which lives as long as Orthanc
    should: the kernel's parent-death signal is tied to that thread.
    """

    def __init__(self, settings: Settings, destination: Destination) -> None:
        self.settings = settings
        self.destination = destination
        self.workdir = settings.node.data_dir / "orthanc"
        self.log_path = settings.node.data_dir / "logs" / "orthanc.log"
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._error: str = ""
        self._thread: threading.Thread | None = None

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
        for port in (self.destination.port, e.orthanc_http_port):
            if _listening(port):
                raise EmbeddedError(
                    f"port {port} of the embedded PACS is taken by another program; set "
                    "the embedded destination's port or [embedded] orthanc_http_port"
                )
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(orthanc_config(self.settings, self.destination), indent=2))
        self._thread = threading.Thread(
            target=self._supervise,
            args=(executable, config),
            name="dicom-node-orthanc",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + e.startup_timeout_seconds
        while time.monotonic() < deadline and not self._error:
            if self._started.wait(0.1):
                return
        self.stop()
        raise EmbeddedError(
            self._error
            or f"the embedded Orthanc did not listen within {e.startup_timeout_seconds:.0f} s "
            f"(see {self.log_path})"
        )

    def _spawn(self, executable: str, config: Path) -> subprocess.Popen:
        # Debian's DCMTK-based receivers stall ~40 ms per message without TCP_NODELAY.
        env = dict(os.environ, TCP_NODELAY="1")
        with open(self.log_path, "ab") as out:
            return subprocess.Popen(
                [executable, str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent,
            )

    def _supervise(self, executable: str, config: Path) -> None:
        backoff = 1.0
        e = self.settings.embedded
        while not self._stopping.is_set():
            self.proc = self._spawn(executable, config)
            began = time.monotonic()
            ports = (self.destination.port, e.orthanc_http_port)
            while self.proc.poll() is None and not self._stopping.is_set():
                if not self._started.is_set() and all(_listening(p) for p in ports):
                    log.info(
                        "embedded PACS: Orthanc %s on 127.0.0.1:%d (HTTP %d), data in %s",
                        self.destination.ae_title,
                        self.destination.port,
                        e.orthanc_http_port,
                        self.workdir,
                    )
                    self._started.set()
                self._stopping.wait(0.1)
            if self._stopping.is_set():
                break
            if not self._started.is_set():
                self._error = (
                    f"the embedded Orthanc exited with status {self.proc.returncode} at start: "
                    f"{_last_line(self.log_path)}"
                )
                return
            if time.monotonic() - began > 60:
                backoff = 1.0
            log.error(
                "embedded PACS: Orthanc exited with status %s; restarting in %.0f s (%s)",
                self.proc.returncode,
                backoff,
                _last_line(self.log_path),
            )
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, 60.0)
        self._terminate()

    def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        self._terminate()


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


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
                time.sleep(1.0 + attempt)  # Orthanc restarting: retry shortly
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

    def __init__(self, settings: Settings, destination: Destination) -> None:
        self.settings = settings
        self.destination = destination
        self._orthanc = _Orthanc(settings, destination)
        self._server: object | None = None
        self._archiver: _Archiver | None = None
        self.viewer_url = ""

    def start(self) -> None:
        """Start Orthanc, then the viewer; raise :class:`EmbeddedError` saying why not."""
        from dicom_node.status import StatusError, StatusServer

        e = self.settings.embedded
        if not (e.viewer_dir / "index.html").is_file():
            raise EmbeddedError(
                f"the viewer is not installed in {e.viewer_dir} (make install unpacks OHIF "
                "there from npm)"
            )
        self._orthanc.start()
        self._archiver = _Archiver(e.orthanc_http_port)
        try:
            server = StatusServer(
                viewer_app(e.viewer_dir, e.orthanc_http_port, hosts=(e.viewer_host,)),
                e.viewer_host,
                e.viewer_port,
                threads=8,  # OHIF fetches metadata and frames in parallel
                name="viewer",
            )
        except StatusError as exc:
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
