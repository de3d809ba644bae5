"""The viewer of the embedded PACS: OHIF's files on one origin with ``/dicom-web``.

The viewer is the prebuilt OHIF ``dist/`` that ``make install`` unpacks from the pinned npm
package. OHIF is a single-page application: any path it routes on the client (``/viewer``,
``/segmentation``...) must return its ``index.html``, and its DICOMweb client expects the
server on the same origin. Orthanc's ServeFolders plugin can do neither, so a small WSGI
application here serves the files (``index.html`` for any path that is not one),
``app-config.js`` written for this origin, and forwards ``/dicom-web/`` to Orthanc.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from flask import Flask, Response, request, send_from_directory

__all__ = ["viewer_app", "viewer_config_js", "viewer_link"]

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


def viewer_app(viewer_dir: Path, orthanc_http_port: int) -> Flask:
    """The viewer's WSGI application: OHIF's files, its config, and ``/dicom-web/``
    forwarded to Orthanc.

    The forwarding is written here rather than taken from a library because it is one
    streamed request per call to a fixed loopback server, which ``http.client`` does in a
    few lines; the WSGI server is the waitress the status pages already use.
    """
    root = Path(viewer_dir).resolve()
    app = Flask(__name__, static_folder=None)
    config_js = viewer_config_js()

    @app.get("/app-config.js")
    def app_config() -> Response:
        return Response(config_js, mimetype="application/javascript", headers=_NO_STORE)

    @app.route("/dicom-web", methods=["GET", "POST"], defaults={"rest": ""})
    @app.route("/dicom-web/<path:rest>", methods=["GET", "POST"])
    def dicomweb(rest: str) -> Response:
        return _forward(orthanc_http_port)

    @app.get("/", defaults={"path": ""})
    @app.get("/<path:path>")
    def files(path: str) -> Response:
        if path and (root / path).is_file():
            return send_from_directory(root, path)
        # a route of the single-page application: OHIF reads the path itself
        return send_from_directory(root, "index.html", max_age=0)

    return app


_NO_STORE = {"Cache-Control": "no-store"}


def _forward(port: int) -> Response:
    """Forward the current request to Orthanc and stream its answer back unchanged."""
    target = urllib.parse.quote(request.path)
    if request.query_string:
        target += "?" + request.query_string.decode("latin-1")
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
