"""The viewer of the embedded PACS: OHIF's files on one origin with ``/dicom-web``.

The viewer is the prebuilt OHIF ``dist/`` that ``make install`` unpacks from the pinned npm
package. OHIF is a single-page application: any path it routes on the client (``/viewer``,
``/segmentation``...) must return its ``index.html``, and its DICOMweb client expects the
server on the same origin. Orthanc's ServeFolders plugin can do neither, so a small WSGI
application here serves the files (``index.html`` for any path that is not one),
``app-config.js`` written for this origin, and forwards to Orthanc the DICOMweb requests
OHIF makes, and nothing else.

Neither Orthanc nor the viewer asks for credentials, so the forwarding is the PACS's only
door: it takes only the QIDO-RS and WADO-RS reads OHIF makes and STOW-RS to ``/studies``
(:func:`dicomweb_target`), with the path checked as sent and as decoded (no dot segment,
no encoded dot, slash, backslash or percent sign) and rebuilt before it is forwarded, and
only from the viewer's own origin (Host and Origin checked), so that neither a crafted path
(``/dicom-web/..%2ftools%2fbulk-delete``) nor another site's page reaches Orthanc's REST API.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

from flask import Flask, Response, request, send_from_directory

from dicom_node.service.audit import AuditTrail

__all__ = ["dicomweb_target", "viewer_app", "viewer_config_js", "viewer_link"]

log = logging.getLogger("dicom_node.service.viewer")

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


def viewer_link(viewer_url: str, study_uid: str, series_uid: str | None = None) -> str:
    """The OHIF URL that opens ``study_uid`` with ``series_uid`` (a SEG, RTSTRUCT or SR)
    shown in the viewport: OHIF 3's ``initialSeriesInstanceUID`` loads that series first
    and, for a derived object, overlays it on the images it references."""
    query = {"StudyInstanceUIDs": study_uid}
    if series_uid:
        query["initialSeriesInstanceUID"] = series_uid
    return f"{viewer_url.rstrip('/')}/viewer?{urllib.parse.urlencode(query)}"


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
            audit.on_access("(viewer)", request.remote_addr or "", request.path, study)
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
