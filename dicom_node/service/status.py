"""The node's HTTP status service: job pages with previews, health checks and metrics.

Routes:

* ``/healthz``: 200 while the process serves requests (liveness);
* ``/readyz``: 200 when the node can take a study: the inference backend is ready, the
  data directory has more free space than ``limits.min_free_disk_mb`` and the spool is
  writable; 503 with the reasons otherwise (readiness);
* ``/metrics``: Prometheus text format (:mod:`dicom_node.service.metrics`);
* ``/``: every series with its state, model, instance count, stage timings and failure;
* ``/jobs/<series_uid>``: one series, with preview images of three key slices
  (:mod:`dicom_node.service.preview`) and its SEG, RTSTRUCT and SR files to download;
* ``POST /fetch`` (a JSON body: ``study``, ``source``, optionally ``series``): fetch a
  study or series from a ``[[sources]]`` PACS (:mod:`dicom_node.sources.fetch`); 202 with
  the fetch's URL, ``GET /fetches/<id>``, which says how it went. The body must be JSON, so
  a page of another origin cannot post it (its browser would have to ask first, and is
  not answered).

Flask renders the pages on the server (Jinja, no scripts, no build step); waitress serves
them from a few threads, which fits a node whose other work runs on threads too. The
service binds to loopback by default: the pages show clinical images, so exposing them is
a deliberate decision (a reverse proxy with authentication in front).

Beyond loopback the pages need credentials: ``[status] auth = "basic"`` or ``"bearer"``
with the secret in ``credentials_file`` or ``credentials_env`` (:mod:`dicom_node.common.credentials`).
Every page then asks for it, except ``/healthz`` and ``/readyz``, which say nothing about
patients and which an orchestrator's probes must reach without a secret. A service bound
beyond loopback without credentials refuses to start.

Every series UID in a URL is checked with :func:`~dicom_node.intake.spool.check_uid` and every file
served must lie inside the data directory, so no URL reaches a file outside it.

With an audit trail (:mod:`dicom_node.service.audit`), a login is a User Authentication
message (the first accepted request of a user from an address in
:data:`~dicom_node.service.audit.LOGIN_INTERVAL_SECONDS`; HTTP authentication has no
sessions), refused credentials a User Authentication failure and a Security Alert, a job
page or preview a DICOM Instances Accessed, and a result file downloaded a DICOM Instances
Transferred.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from flask import (
    Flask,
    Request,
    Response,
    abort,
    jsonify,
    render_template,
    request,
    send_file,
    url_for,
)
from pydicom.errors import InvalidDicomError

from dicom_node.common.credentials import read_credentials
from dicom_node.common.network import is_loopback
from dicom_node.config import ConfigError, Settings
from dicom_node.intake.spool import InvalidUID, check_uid
from dicom_node.service.audit import AuditTrail
from dicom_node.service.metrics import CONTENT_TYPE, JOB_STAGES, NodeMetrics
from dicom_node.service.preview import (
    PREVIEW_NAME,
    Preview,
    PreviewError,
    load_previews,
    make_previews,
)
from dicom_node.service.viewer import viewer_link
from dicom_node.state import (
    CommitmentState,
    JobDatabase,
    ModelResults,
    SeriesRecord,
    SeriesState,
)

log = logging.getLogger("dicom_node.service.status")

__all__ = ["StatusError", "create_app", "readiness"]

#: What of a model's name may name its preview folder.
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")

#: Series listed on the jobs page, newest first; older ones stay reachable at /jobs/<uid>.
JOBS_SHOWN = 500

#: Timing columns of the jobs page, in the order of the chain.
TIMING_COLUMNS = JOB_STAGES

#: Ready when it returns True; it may raise to say why not (the message becomes the reason).
BackendReady = Callable[[], bool]


class StatusError(RuntimeError):
    """The status service cannot start (the port is taken, the host is not an address)."""


def readiness(settings: Settings, backend_ready: BackendReady | None) -> list[str]:
    """Reasons the node cannot take a study now; empty when it can."""
    reasons = []
    if backend_ready is not None:
        try:
            if not backend_ready():
                reasons.append("the inference backend is not ready")
        except Exception as exc:  # noqa: BLE001 - whatever it is, the node is not ready
            reasons.append(f"the inference backend is not ready: {exc}")
    data_dir = settings.node.data_dir
    spool = data_dir / "spool"
    watermark = settings.limits.min_free_disk_mb
    try:
        free_mb = shutil.disk_usage(data_dir).free // (1024 * 1024)
    except OSError as exc:
        reasons.append(f"the data directory {data_dir} cannot be read: {exc.strerror}")
    else:
        if free_mb < watermark:
            reasons.append(
                f"only {free_mb} MB free in {data_dir}, below limits.min_free_disk_mb "
                f"({watermark} MB)"
            )
    try:
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".ready-"):
            pass
    except OSError as exc:
        reasons.append(f"the spool {spool} is not writable: {exc.strerror or exc}")
    return reasons


def create_app(
    settings: Settings,
    jobs: JobDatabase,
    metrics: NodeMetrics,
    backend_ready: BackendReady | None = None,
    viewer_url: str | None = None,
    audit: AuditTrail | None = None,
    on_fetch: Callable[[], None] | None = None,
) -> Flask:
    """The Flask application of the status service for one node.

    With ``viewer_url`` (the embedded viewer's), each finished series links to the viewer
    with its SEG loaded. ``on_fetch`` is called after a fetch was asked for (the fetch
    worker's ``wake``). With ``audit``, logins and what the pages show are audited (see
    the module).
    """
    app = Flask(__name__)
    audit = audit or AuditTrail(None, settings.node.ae_title)
    _require_credentials(app, settings, audit)
    data_dir = settings.node.data_dir.resolve()
    results_dir = data_dir / "results"
    preview_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
    locks_lock = threading.Lock()

    def series_or_404(series_uid: str) -> SeriesRecord:
        try:
            uid = check_uid(series_uid, "Series Instance UID")
        except InvalidUID:
            abort(404)
        record = jobs.series.get(uid)
        if record is None:
            abort(404)
        return record

    def inside_data_dir(path: Path) -> Path:
        # Paths come from the job database the node wrote; checked anyway so that a URL can
        # never be turned into a read of another file.
        resolved = path.resolve()
        if not resolved.is_relative_to(data_dir) or not resolved.is_file():
            abort(404)
        return resolved

    def model_or_404(record: SeriesRecord, name: str | None) -> ModelResults:
        """One model's results of a done series (the first model's without a name)."""
        if record.state != SeriesState.DONE or not record.results:
            abort(404)
        found = record.results.models[0] if name is None else record.results.model(name)
        if found is None:
            abort(404)
        return found

    def preview_dir(record: SeriesRecord, model: ModelResults) -> Path:
        # One folder a model: a series routed to several models has previews of each SEG.
        folder = _SAFE_NAME.sub("_", model.model) or "_"
        return results_dir / record.series_uid / "previews" / folder

    def previews_for(record: SeriesRecord, model: ModelResults) -> tuple[list[Preview], str]:
        """Cached previews of one model's SEG, drawn on first request; or why there are none."""
        seg = model.files.get("SEG")
        if record.state != SeriesState.DONE or seg is None:
            return [], ""
        out_dir = preview_dir(record, model)
        with locks_lock:
            lock = preview_locks[record.series_uid]
        with lock:  # two browsers opening one job draw its previews once
            cached = load_previews(out_dir, seg.sop_uid)
            if cached is not None:
                return cached, ""
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                previews = make_previews(
                    jobs.instances.paths(record.series_uid),
                    inside_data_dir(Path(seg.path)),
                    out_dir,
                )
            except PreviewError as exc:
                log.warning("series %s: no previews: %s", record.series_uid, exc)
                return [], str(exc)
            return previews, ""

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="alive")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        reasons = readiness(settings, backend_ready)
        return jsonify(ready=not reasons, reasons=reasons), 503 if reasons else 200

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)

    @app.get("/")
    def index() -> str:
        every = jobs.series.records()
        records = sorted(every, key=lambda r: r.first_received, reverse=True)[:JOBS_SHOWN]
        outbox: defaultdict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        committed: defaultdict[str, int] = defaultdict(int)
        for item in jobs.outbox.items():
            outbox[item.series_uid][str(item.state)] += 1
            committed[item.series_uid] += item.commitment == CommitmentState.COMMITTED
        depth = {str(state): n for state, n in jobs.series.counts_by_state().items()}
        depth["outbox_pending"] = jobs.outbox.pending_count()
        return render_template(
            "jobs.html",
            records=records,
            total=len(every),
            outbox=outbox,
            committed=committed,
            depth=depth,
            stages=TIMING_COLUMNS,
            node=settings.node,
        )

    def audit_access(record: SeriesRecord) -> None:
        paths = jobs.instances.paths(record.series_uid)
        audit.on_access(
            _user(request),
            request.remote_addr or "",
            request.path,
            record.study_uid,
            paths[0] if paths else None,
        )

    @app.get("/jobs/<series_uid>")
    def job(series_uid: str) -> str:
        record = series_or_404(series_uid)
        audit_access(record)
        models = []
        for model in record.results if record.state == SeriesState.DONE else []:
            previews, problem = previews_for(record, model)
            models.append(
                {
                    "name": model.model,
                    "volumes_ml": model.volumes_ml,
                    "algorithm": model.algorithm,
                    "files": model.kinds(),
                    "previews": previews,
                    "preview_problem": problem,
                    "viewer": _viewer_link(viewer_url, record, model),
                }
            )
        return render_template(
            "job.html",
            record=record,
            models=models,
            outbox=jobs.outbox.items(record.series_uid),
            stages=TIMING_COLUMNS,
            node=settings.node,
        )

    @app.get("/jobs/<series_uid>/files/<kind>")
    def result_file(series_uid: str, kind: str) -> Response:
        """A result file; ``?model=`` names the model (default: the first)."""
        record = series_or_404(series_uid)
        model = model_or_404(record, request.args.get("model"))
        kind = kind.upper()
        info = model.files.get(kind)
        if info is None:
            abort(404)
        path = inside_data_dir(Path(info.path))
        audit.on_fetched(_user(request), request.remote_addr or "", path)
        return send_file(
            path,
            mimetype="application/dicom",
            as_attachment=True,
            download_name=f"{kind.lower()}-{record.series_uid}.dcm",
        )

    @app.get("/jobs/<series_uid>/previews/<name>")
    def preview_image(series_uid: str, name: str) -> Response:
        """A preview PNG; ``?model=`` names the model (default: the first)."""
        record = series_or_404(series_uid)
        model = model_or_404(record, request.args.get("model"))
        if not PREVIEW_NAME.match(name):
            abort(404)
        path = inside_data_dir(preview_dir(record, model) / name)
        audit_access(record)
        return send_file(path, mimetype="image/png", max_age=0)

    @app.post("/fetch")
    def fetch() -> tuple[Response, int]:
        """Ask for a fetch: ``{"study": UID, "source": NAME, "series": UID}`` (series
        optional); 202 with its id and URL, 400 with one sentence for a bad request."""
        body: Any = request.get_json(silent=True) if request.is_json else None
        if not isinstance(body, dict):
            return jsonify(error='send a JSON object: {"study": UID, "source": NAME}'), 400
        sources = [s.name for s in settings.sources]
        source = body.get("source") or (sources[0] if len(sources) == 1 else None)
        if source not in sources:
            known = ", ".join(repr(n) for n in sources) or "none is configured"
            return jsonify(error=f"source must name a [[sources]] entry ({known})"), 400
        try:
            study = check_uid(str(body.get("study") or ""), "Study Instance UID")
            series = body.get("series") or ""
            series = check_uid(str(series), "Series Instance UID") if series else ""
        except InvalidUID as exc:
            return jsonify(error=str(exc)), 400
        fetch_id = jobs.fetches.add(
            source, study, series, requested_by=f"status service ({request.remote_addr})"
        )
        log.info("fetch %d asked for by %s", fetch_id, request.remote_addr)
        if on_fetch is not None:
            on_fetch()
        url = url_for("fetch_record", fetch_id=fetch_id)
        return jsonify(id=fetch_id, url=url), 202

    @app.get("/fetches/<int:fetch_id>")
    def fetch_record(fetch_id: int) -> Response:
        """A fetch as recorded: its state, its reason, each series and how it went."""
        record = jobs.fetches.get(fetch_id)
        if record is None:
            abort(404)
        return jsonify(record.to_json())

    @app.template_filter("when")
    def when(seconds: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))

    return app


def _viewer_link(viewer_url: str | None, record: SeriesRecord, model: ModelResults) -> str:
    """The viewer's URL of a finished series with ``model``'s SEG loaded, or "" without one.

    The SEG's Series Instance UID is read from its header: the job records files by SOP
    Instance UID only.
    """
    seg = model.files.get("SEG")
    if not viewer_url or record.state != SeriesState.DONE or seg is None:
        return ""

    try:
        header = pydicom.dcmread(
            seg.path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
        )
    except (OSError, InvalidDicomError):
        return ""
    return viewer_link(viewer_url, record.study_uid, str(header.SeriesInstanceUID))


#: Paths served without credentials: liveness and readiness, for probes.
OPEN_PATHS = ("/healthz", "/readyz")


def _user(req: Request) -> str:
    """Who made an authenticated request: the basic user, ``(bearer token)`` or
    ``(anonymous)`` on a service without credentials."""
    header = req.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return "(unreadable basic credentials)"
    if scheme.lower() == "bearer":
        return "(bearer token)"
    return "(anonymous)"


def _require_credentials(app: Flask, settings: Settings, audit: AuditTrail) -> None:
    """Ask every request but :data:`OPEN_PATHS` for the configured credentials.

    Raises :class:`StatusError` when the service would be reachable beyond loopback
    without credentials, or they cannot be read.
    """
    status = settings.status
    try:
        credentials = read_credentials(
            status.auth, status.credentials_file, status.credentials_env, "status"
        )
    except ConfigError as exc:
        raise StatusError(str(exc)) from None
    if credentials is None:
        if not is_loopback(status.host):
            raise StatusError(
                f"the status service would be reachable beyond this machine on "
                f"{status.host} without credentials: set [status] auth with "
                "credentials_file or credentials_env, or bind it to 127.0.0.1"
            )
        return
    challenge = (
        'Basic realm="dicom-node", charset="UTF-8"'
        if credentials.kind == "basic"
        else ('Bearer realm="dicom-node"')
    )

    @app.before_request
    def authenticate() -> Response | None:
        if request.path in OPEN_PATHS:
            return None
        presented = request.headers.get("Authorization")
        if credentials.accepts(presented):
            audit.on_login(_user(request), request.remote_addr or "", accepted=True)
            return None
        if presented:  # a browser's first request carries none: that is no failed login
            audit.on_login(
                _user(request),
                request.remote_addr or "",
                accepted=False,
                reason=f"{credentials.kind} credentials refused for {request.path[:200]}",
            )
        log.info("status service: request for %s without valid credentials", request.path)
        return Response(
            "credentials required\n",
            status=401,
            mimetype="text/plain",
            headers={"WWW-Authenticate": challenge},
        )
