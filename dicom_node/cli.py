"""``dicom-node`` command line: serve, jobs, retry, fetch, validate-config, model install, push.

Errors a user can cause (a bad config, an unreachable peer, a missing file) end the command
with one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.state.database import DatabaseError

if TYPE_CHECKING:
    from dicom_node.node import Node
    from dicom_node.state import JobDatabase

log = logging.getLogger("dicom_node")


class UserError(Exception):
    """Something the person running the command can fix; printed as one line."""


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.config,
        port=getattr(args, "port", None),
        ae_title=getattr(args, "ae_title", None),
        data_dir=getattr(args, "data_dir", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.node import Node
    from dicom_node.service.logs import setup_logging

    settings = _settings(args)
    setup_logging(settings.node.data_dir, settings.node.log_json)
    node = Node(settings)
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from dicom_node.service.embedded import EmbeddedError
    from dicom_node.service.status import StatusError
    from dicom_node.service.web import WebServerError

    try:
        node.start()
    except (StatusError, WebServerError, EmbeddedError) as exc:
        node.stop()
        raise UserError(str(exc)) from None
    except OSError as exc:
        node.stop()
        raise UserError(
            f"cannot listen on {settings.node.host}:{settings.node.port}: {exc.strerror}"
        ) from None
    if node.embedded is not None:
        print(f"viewer: {node.embedded.viewer_url}", flush=True)
    if settings.inference.backend == "triton" and not settings.inference.triton_url:
        # Start Triton now rather than on the first series, so the first study is fast.
        threading.Thread(target=_warm_backend, args=(node,), daemon=True).start()
    while not stopping.wait(1.0):
        pass
    node.stop()
    return 0


def _warm_backend(node: Node) -> None:
    try:
        node.backends.get()
        log.info("inference backend ready")
    except Exception as exc:  # noqa: BLE001 - jobs retry; the operator sees the reason
        log.error("inference backend not ready: %s", exc)


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_node.state import JobDatabase, SeriesListing

    settings = _settings(args)
    db = settings.node.data_dir / "jobs.sqlite"
    rows: list[SeriesListing] = []
    if db.exists():
        store = JobDatabase(db)
        try:
            rows = store.listing()
        finally:
            store.close()
    if args.json:
        json.dump([r.to_json() for r in rows], sys.stdout, indent=2)
        print()
        return 0
    print(f"{'series':<64} {'state':<11} {'inst':>5}  {'completed by':<20}  reason")
    for row in rows:
        r = row.record
        print(
            f"{r.series_uid:<64} {r.state!s:<11} {r.instance_count:>5}  "
            f"{r.completed_by or '-':<20}  {r.reason}"
        )
        if r.fetched_from:
            print(f"    fetched from {r.fetched_from}")
        if r.topped_up:
            print(f"    topped up: {r.topped_up}")
        for item in row.outbox:
            problem = item.commit_reason or item.last_error
            if item.commitment is not None or problem:
                commitment = f", {item.commitment}" if item.commitment else ""
                print(
                    f"    {item.kind} to {item.destination}: {item.state}{commitment}"
                    + (f": {problem}" if problem else "")
                )
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node.state import JobDatabase

    settings = _settings(args)
    store = JobDatabase(settings.node.data_dir / "jobs.sqlite")
    n = store.series.retry(args.series_uid)
    store.close()
    if n == 0:
        raise UserError(f"series {args.series_uid} has nothing failed to retry")
    print(f"queued again: {n} item(s); a running node picks them up")
    return 0


#: Seconds a running node has to take up a fetch before the command gives up on it.
FETCH_PICKUP_SECONDS = 15.0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Ask the running node to fetch a study (or one series) from a source, and follow it:
    the retrieve, then each series' job, unless ``--no-wait``."""
    from dicom_node.intake.spool import InvalidUID, check_uid
    from dicom_node.state import FetchState
    from dicom_node.state import JobDatabase as Database

    settings = _settings(args)
    names = [s.name for s in settings.sources]
    source = args.source or (names[0] if len(names) == 1 else "")
    if source not in names:
        known = ", ".join(repr(n) for n in names)
        raise UserError(
            f"--from must name a [[sources]] entry of the configuration ({known})"
            if names
            else "the configuration has no [[sources]]: add the PACS to fetch from"
        )
    try:
        study = check_uid(args.study, "--study")
        series = check_uid(args.series, "--series") if args.series else ""
    except InvalidUID as exc:
        raise UserError(str(exc)) from None
    jobs = Database(settings.node.data_dir / "jobs.sqlite")
    try:
        fetch_id = jobs.fetches.add(source, study, series, requested_by="command line")
        what = f"series {series} of study {study}" if series else f"study {study}"
        print(f"fetch {fetch_id}: {what} from {source}", flush=True)
        asked = time.monotonic()
        record = jobs.fetches.get(fetch_id)
        while record is not None and not record.state.finished:
            if record.state == FetchState.PENDING and time.monotonic() - asked > args.pickup:
                if jobs.fetches.withdraw(fetch_id, "no running node took it up"):
                    raise UserError(
                        f"no node took fetch {fetch_id} up within {args.pickup:g} s: start "
                        "`dicom-node serve` with this configuration and data directory"
                    )
            time.sleep(0.2)
            record = jobs.fetches.get(fetch_id)
        assert record is not None
        if record.state == FetchState.FAILED:
            raise UserError(record.reason)
        for s in record.series:
            print(
                f"series {s.series_uid}: {s.new} of {s.expected} instances retrieved, {s.state}",
                flush=True,
            )
        if args.no_wait:
            return 0
        return _follow_jobs(jobs, [s.series_uid for s in record.series], args.timeout)
    finally:
        jobs.close()


def _follow_jobs(jobs: JobDatabase, series_uids: list[str], timeout: float) -> int:
    """Wait for each series' job to end; print how each ended. 0 when all are done."""
    from dicom_node.state import SeriesState

    deadline = time.monotonic() + timeout
    waiting = list(series_uids)
    status = 0
    while waiting:
        for uid in list(waiting):
            record = jobs.series.get(uid)
            if record is None or not record.state.finished:
                continue
            waiting.remove(uid)
            if record.state == SeriesState.DONE:
                kinds = sorted({i.kind for i in jobs.outbox.items(uid)}) or ["no destination"]
                print(f"series {uid}: done ({', '.join(kinds)})", flush=True)
            else:
                status = 1
                print(f"series {uid}: {record.state}: {record.reason}", flush=True)
        if waiting and time.monotonic() > deadline:
            raise UserError(
                f"{len(waiting)} series not processed within {timeout:g} s: "
                "`dicom-node jobs` shows where they are"
            )
        if waiting:
            time.sleep(0.5)
    return status


def cmd_validate(args: argparse.Namespace) -> int:
    load_settings(Path(args.file))
    print(f"{args.file}: valid")
    return 0


def cmd_model_install(args: argparse.Namespace) -> int:
    from dicom_node.pipeline.install import (
        CODE_NOTICE,
        BundleInstallError,
        describe_bundle,
        install_bundle,
    )

    print(CODE_NOTICE, flush=True)
    try:
        path = install_bundle(args.source, Path(args.dest))
    except BundleInstallError as exc:
        raise UserError(str(exc)) from None
    print(f'installed {path}; set [inference] bundle = "{path}" to use it')
    print(describe_bundle(path))
    return 0


def cmd_model_export_triton(args: argparse.Namespace) -> int:
    """Write the Triton models of a configured model, for a server the node does not run."""
    from dicom_node.inference.triton.repository import write_models
    from dicom_node.pipeline import BundleError

    settings = load_settings(Path(args.config) if args.config else None)
    model = next((m for m in settings.models if m.name == args.name), None)
    if model is None:
        names = ", ".join(m.name for m in settings.models)
        raise UserError(f"no [[models]] entry is named {args.name!r} (configured: {names})")
    try:
        written = write_models(
            model.name,
            model.bundle,
            Path(args.dir),
            max_batch=args.max_batch,
            instances=args.instances,
        )
    except BundleError as exc:
        raise UserError(str(exc)) from None
    print(
        f"wrote Triton models {', '.join(written)} into {args.dir}; they load the bundle from "
        f"{model.bundle}, which must be at that path on the Triton host"
    )
    return 0


def _parse_peer(text: str) -> tuple[str, str, int]:
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return ae, host, int(port)
    except ValueError:
        raise UserError(f"--to {text!r} is not AE@HOST:PORT") from None


def cmd_push(args: argparse.Namespace) -> int:
    from dicom_node.export.push import push_paths

    ae, host, port = _parse_peer(args.to)
    paths = [Path(p) for p in args.paths]
    for p in paths:
        if not p.exists():
            raise UserError(f"{p} does not exist")
    t0 = time.perf_counter()
    try:
        report = push_paths(
            paths, ae, host, port, calling_ae=args.calling_ae, progress=not args.quiet
        )
    except ConnectionError as exc:
        raise UserError(str(exc)) from None
    dt = time.perf_counter() - t0
    print(
        f"sent {report.sent}, failed {report.failed}, skipped {report.skipped} "
        f"in {dt:.1f} s ({report.sent / dt if dt else 0:.0f} instances/s)"
    )
    return 0 if report.failed == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="TOML configuration (default: config/node.toml)",
        )
        p.add_argument("--data-dir", type=Path, default=None, help="override [node] data_dir")
        return p

    p = with_config(sub.add_parser("serve", help="run the node"))
    p.add_argument("--port", type=int, default=None, help="override [node] port")
    p.add_argument("--ae-title", default=None, help="override [node] ae_title")
    p.set_defaults(func=cmd_serve)

    p = with_config(sub.add_parser("jobs", help="list every series the node knows"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)

    p = with_config(sub.add_parser("retry", help="queue a failed series or its results again"))
    p.add_argument("series_uid")
    p.set_defaults(func=cmd_retry)

    p = with_config(
        sub.add_parser(
            "fetch", help="segment a study from a [[sources]] PACS: retrieve it, then wait"
        )
    )
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--series", default="", help="only this Series Instance UID of the study")
    p.add_argument(
        "--from",
        dest="source",
        default="",
        help="the [[sources]] name (may be left out when there is one)",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="return once retrieved, before processing"
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for the jobs to end"
    )
    p.add_argument(
        "--pickup",
        type=float,
        default=FETCH_PICKUP_SECONDS,
        help="seconds a running node has to take the fetch up",
    )
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("validate-config", help="check a configuration file")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("model", help="manage model bundles")
    msub = p.add_subparsers(dest="model_command", required=True)
    pi = msub.add_parser("install", help="install a MONAI bundle from a folder or by name")
    pi.add_argument("source", help="a bundle folder, or a MONAI model-zoo name (needs network)")
    pi.add_argument("--dest", default="bundles", help="folder that receives the bundle")
    pi.set_defaults(func=cmd_model_install)
    pe = msub.add_parser(
        "export-triton",
        help="write the Triton models that serve a configured model, to copy to a server",
    )
    pe.add_argument("name", help="the model's name in [[models]]")
    pe.add_argument("dir", help="the model repository to write into")
    pe.add_argument("--config", help="the node's configuration (default: config/node.toml)")
    pe.add_argument("--max-batch", type=int, default=8, help="patches per network batch")
    pe.add_argument("--instances", type=int, default=1, help="model instances per device")
    pe.set_defaults(func=cmd_model_export_triton)

    p = sub.add_parser("push", help="send DICOM files or folders with C-STORE")
    p.add_argument("paths", nargs="+")
    p.add_argument("--to", required=True, help="AE@HOST:PORT of the receiver")
    p.add_argument("--calling-ae", default="DICOM_NODE_PUSH")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, DatabaseError, UserError) as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
