"""Real peers for the tests: the node as a process, Orthanc, and DCMTK's tools.

Each starts on free loopback ports in a temporary folder and is stopped by its fixture.
Debian's DCMTK stalls ~45 ms per instance unless the receiving process has
``TCP_NODELAY=1`` in its environment, so receivers get it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicom_node.common.associations import TUNE_REQUESTED

if TYPE_CHECKING:
    from dicom_node.inference.triton.server import TritonServer

ROOT = Path(__file__).resolve().parent.parent
#: The tests' own small data (published configs, schemas), committed with them.
TEST_DATA = ROOT / "tests" / "data"


#: The Triton models and demo bundles the tests serve (``make demo-bundle`` trains the bundles).
MODEL_REPOSITORY = ROOT / "model_repository"
SPLEEN_BUNDLE = ROOT / "bundles" / "spleen_ct_demo"
LIVER_BUNDLE = ROOT / "bundles" / "liver_ct_demo"


def triton_server(
    work_dir: Path,
    models: list[str],
    env: dict[str, str] | None = None,
    *,
    fixed_ports: bool = False,
    startup_timeout: float = 180.0,
) -> TritonServer:
    """A Triton server (not started) on the project's model repository, on loopback.

    Ports are picked when it starts, unless ``fixed_ports``: a server a test stops and starts
    again then comes back where its clients look for it.
    """
    from dicom_node.inference.triton.server import TritonServer  # the node's own supervision

    ports = [free_port() for _ in range(3)] if fixed_ports else [0, 0, 0]
    return TritonServer(
        MODEL_REPOSITORY,
        work_dir,
        grpc_port=ports[0],
        http_port=ports[1],
        metrics_port=ports[2],
        models=models,
        startup_timeout=startup_timeout,
        env={"CUDA_VISIBLE_DEVICES": "", **(env or {})},
    )


def testdata() -> Path:
    """The shared real-data folder (``DICOM_NODE_TESTDATA`` or ``../shared/data``)."""
    env = os.environ.get("DICOM_NODE_TESTDATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@contextlib.contextmanager
def small_tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` mounted at ``path`` (made), for a disk that fills up; the test
    is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def associate(ae: AE, port: int, **kwargs: Any) -> tuple[Association, tuple[int, int, int] | None]:
    """``ae.associate`` with the node at ``port`` on loopback, and the node's rejection if it
    rejected: the (result, source, reason) of its A-ASSOCIATE-RJ.

    The rejection is read from the PDU as it arrives: pynetdicom now and then takes a
    rejection that arrives together with the connection's close for an abort (the node
    closes a second after its rejection, pynetdicom's own rejections at once), which a
    requestor on a loaded machine met.
    """
    seen: list[A_ASSOCIATE_RJ] = []

    def keep(event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            seen.append(event.pdu)

    handlers = [(evt.EVT_PDU_RECV, keep), TUNE_REQUESTED]  # TUNE_REQUESTED: as the node's own
    assoc = ae.associate("127.0.0.1", port, evt_handlers=handlers, **kwargs)
    if not seen:
        return assoc, None
    return assoc, (seen[0].result, seen[0].source, seen[0].reason_diagnostic)


def _ports_of_this_worker() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, a share of their own to each xdist worker.

    A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, from which
    every outgoing connection of every test also takes its local port: a peer told to listen
    there a moment later could find it taken and exit. Below that range only listeners bind,
    and each worker keeps to its own share, so two workers never pick the same port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, shares = 10000, 16
    size = max(64, (low - first) // shares)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = first + (int(worker) % shares if worker.isdigit() else 0) * size
    offset = (os.getpid() * 7) % size
    while True:
        for i in range(size):
            yield start + (offset + i) % size


_PORTS = _ports_of_this_worker()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on or is connected from now, and that no
    other test of this run is given."""
    for _ in range(4096):
        port = next(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; a
    ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not reached in {timeout} s")


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def dcmtk(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a DCMTK tool; the result keeps stdout and stderr for assertions."""
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def echoscu(port: int, aet: str = "DICOM_NODE", calling: str = "ECHOSCU") -> bool:
    r = dcmtk("echoscu", "-aet", calling, "-aec", aet, "-to", "10", "127.0.0.1", str(port))
    return r.returncode == 0


def managed_triton(**settings: Any) -> dict[str, Any]:
    """An ``[inference]`` section: the node's own Triton server, on ports the system picks."""
    return {
        "backend": "triton",
        "grpc_port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "retry_backoff_seconds": 1.0,
        **settings,
    }


def pacs_destination(pacs: Orthanc, **settings: Any) -> dict[str, Any]:
    """A ``[[destinations]]`` table for an Orthanc of the tests, retried quickly."""
    return {
        "name": "pacs",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "retry_backoff_seconds": 0.5,
        "max_backoff_seconds": 2.0,
        **settings,
    }


def storescu(
    port: int,
    paths: list[Path] | Path,
    aet: str = "DICOM_NODE",
    calling: str = "STORESCU",
    *extra: str,
) -> subprocess.CompletedProcess:
    paths = [paths] if isinstance(paths, Path) else paths
    args = ["-aet", calling, "-aec", aet, "-to", "30", *extra, "127.0.0.1", str(port)]
    if any(p.is_dir() for p in paths):
        args = ["+sd", "+r", *args]
    return dcmtk("storescu", *args, *map(str, paths))


class NodeProcess:
    """``dicom-node serve`` in a subprocess, on its own config and data dir.

    ``command`` is the module run with ``-m``: ``dicom_node_testing.cli`` runs the same
    command with the ``threshold`` backend registered; ``env`` is added to its environment.
    """

    def __init__(
        self,
        workdir: Path,
        command: str = "dicom_node",
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> None:
        self.command = command
        self.env = env or {}
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data_dir = self.workdir / "var"
        self.config = self.workdir / "node.toml"
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "node.out"
        self.write_config(**overrides)

    def write_config(self, **sections: Any) -> None:
        node = {
            "ae_title": "DICOM_NODE",
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.data_dir),
            "settle_seconds": 1.0,
            "min_free_disk_mb": 1,
        }
        node.update(sections.pop("node", {}))
        self.data_dir = Path(node["data_dir"])
        inference = {"backend": "local"}
        inference.update(sections.pop("inference", {}))
        limits = {"min_free_disk_mb": node.pop("min_free_disk_mb")}
        limits.update(sections.pop("limits", {}))
        doc = {"node": node, "limits": limits, "inference": inference}
        doc.update(sections)
        self.config.write_text(_toml(doc))

    def start(self, timeout: float = 60.0) -> NodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.command, "serve", "--config", str(self.config)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        wait_port(self.port, timeout, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL the node and everything it started (a crash, not a shutdown)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if self.proc else None
        except ProcessLookupError:
            pass
        if hasattr(self, "_out"):
            self._out.close()

    def jobs(self) -> list[dict]:
        """What ``dicom-node jobs --json`` prints, read here rather than by starting the CLI
        on each poll (a test of the CLI checks they agree)."""
        from dicom_node.state import JobDatabase

        db = self.data_dir / "jobs.sqlite"
        if not db.exists():
            return []
        store = JobDatabase(db)
        try:
            return json.loads(json.dumps([row.to_json() for row in store.listing()]))
        finally:
            store.close()

    def jobs_from_cli(self) -> list[dict]:
        """``dicom-node jobs --json``."""
        r = subprocess.run(
            [sys.executable, "-m", self.command, "jobs", "--config", str(self.config), "--json"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return json.loads(r.stdout)

    def wait_for_results_sent(self, series_uid: str, timeout: float, what: str) -> list[dict]:
        """Wait until the series' job is done and every result it queued was sent."""

        def sent(jobs: list[dict]) -> bool:
            job = next((j for j in jobs if j["series_uid"] == series_uid), None)
            return bool(
                job
                and job["state"] == "done"
                and job["outbox"]
                and all(o["state"] == "sent" for o in job["outbox"])
            )

        return self.wait_for(sent, timeout=timeout, what=what, failures_allowed=False)

    def wait_for(
        self,
        predicate,
        timeout: float = 120.0,
        what: str = "condition",
        failures_allowed: bool = True,
    ) -> list[dict]:
        """Poll ``dicom-node jobs`` until ``predicate(jobs)``; a failed job ends the wait
        at once (with its reason) when ``failures_allowed`` is false."""
        deadline = time.time() + timeout
        jobs: list[dict] = []
        while time.time() < deadline:
            jobs = self.jobs()
            failed = [j for j in jobs if j["state"] == "failed"]
            if failed and not failures_allowed:
                raise AssertionError(f"job failed while waiting for {what}: {failed[0]['reason']}")
            if predicate(jobs):
                return jobs
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited ({self.proc.returncode}): {self.tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"{what} not reached in {timeout} s; jobs: {jobs}\n{self.tail()}")

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Wait until the node's log says ``text`` (fails at once if the node exits)."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged in {timeout} s\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def _toml(doc: dict) -> str:
    """Just enough TOML for test configs (tables, arrays of tables, scalars, lists)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for name, table in doc.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {val(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {val(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class Orthanc:
    """Debian's Orthanc as a PACS on loopback, from a JSON config in a temp folder."""

    #: Debian's orthanc-dicomweb plugin (STOW-RS, QIDO-RS, WADO-RS under /dicom-web/).
    DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(
        self,
        workdir: Path,
        modalities: dict[str, list] | None = None,
        *,
        dicomweb: bool = False,
        config: dict[str, Any] | None = None,
        rest_auth: tuple[str, str] | None = None,
        count_deliveries: bool = False,
    ) -> None:
        """``dicomweb``: load the DICOMweb plugin; ``config``: keys that replace the
        defaults below; ``rest_auth``: the user and password :meth:`rest` sends (for a
        ``config`` with ``AuthenticationEnabled``); ``count_deliveries``: log every
        instance received, duplicates included (:meth:`deliveries`)."""
        self.count_deliveries = count_deliveries
        self.dicomweb = dicomweb
        self.extra_config = dict(config or {})
        self.rest_auth = rest_auth
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.aet = "ORTHANC"
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        storage = self.workdir / "db"
        storage.mkdir(exist_ok=True)
        cfg = {
            "Name": "test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "DicomCheckCalledAet": True,
            "Plugins": [],
            "StableAge": 1,
            "SaveJobs": False,
        }
        if self.dicomweb:
            cfg["Plugins"] = [self.DICOMWEB_PLUGIN]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.count_deliveries:
            # Orthanc calls this for every instance it receives, by any protocol, before it
            # checks whether it already has it: a second delivery is a second line
            script = self.workdir / "count.lua"
            script.write_text(
                "function ReceivedInstanceFilter(dicom, origin, info)\n"
                "  print('DELIVERED ' .. dicom.SOPInstanceUID)\n"
                "  return true\n"
                "end\n"
            )
            cfg["LuaScripts"] = [str(script)]
        cfg.update(self.extra_config)
        (self.workdir / "orthanc.json").write_text(json.dumps(cfg))
        env = dict(os.environ, TCP_NODELAY="1")
        self._out = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(
            [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(self.workdir / "orthanc.json")],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_port(self.http_port, 60, self.proc)
        wait_port(self.dicom_port, 60, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_out"):
            self._out.close()

    def rest(self, path: str, data: Any = None, method: str | None = None) -> Any:
        body = (
            None
            if data is None
            else (data if isinstance(data, bytes) else json.dumps(data).encode())
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        if self.rest_auth is not None:
            token = base64.b64encode(":".join(self.rest_auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def instances_by_modality(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for iid in self.rest("/instances"):
            tags = self.rest(f"/instances/{iid}/simplified-tags")
            out.setdefault(tags.get("Modality", ""), []).append(iid)
        return out

    def file(self, instance_id: str) -> bytes:
        return self.rest(f"/instances/{instance_id}/file")

    def download_study(self, study_uid: str, dest: Path) -> list[Path]:
        """Every instance of a study as the PACS holds it, written to files in ``dest``."""
        query = {"StudyInstanceUID": study_uid}
        found = self.rest("/tools/find", {"Level": "Instance", "Expand": True, "Query": query})
        paths = []
        for inst in found:
            path = dest / f"{inst['ID']}.dcm"
            path.write_bytes(self.file(inst["ID"]))
            paths.append(path)
        return paths

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root of the plugin (STOW-RS at ``/studies``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def deliveries(self) -> dict[str, int]:
        """SOP Instance UID -> times Orthanc received it (``count_deliveries``)."""
        counts: dict[str, int] = {}
        log = self.workdir / "orthanc.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if "Lua says: DELIVERED " in line:
                uid = line.rsplit(" ", 1)[-1]
                counts[uid] = counts.get(uid, 0) + 1
        return counts


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """Debian's headless Chromium on ``args`` (``--dump-dom URL``, ``--screenshot``), with a
    fresh profile and nothing that reaches beyond this machine."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: `make install` installs it")
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class StoreSCP:
    """DCMTK's ``storescp`` on loopback: a C-STORE receiver (a C-MOVE destination) writing
    each instance it accepts into ``folder``."""

    def __init__(self, workdir: Path, aet: str = "STORESCP") -> None:
        self.folder = Path(workdir) / "received"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.aet, "+xa", "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, TCP_NODELAY="1"),
            start_new_session=True,
        )
        wait_port(self.port, 30, self.proc)
        return self

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> file, of every instance received so far."""
        import pydicom

        out = {}
        for f in sorted(self.folder.iterdir()):
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            out[str(ds.SOPInstanceUID)] = f
        return out

    def clear(self) -> None:
        for f in self.folder.iterdir():
            f.unlink()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class DcmQRSCP:
    """DCMTK's ``dcmqrscp`` as a Query/Retrieve SCP (C-FIND, C-MOVE, C-GET) on loopback,
    from a configuration file written in ``workdir``.

    ``destinations`` maps the AE titles it may move to onto (host, port); instances are
    put in with C-STORE (:meth:`store`), which it accepts from anyone.
    """

    def __init__(
        self,
        workdir: Path,
        aet: str = "DCMQRSCP",
        destinations: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.storage = self.workdir / "db"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = free_port()
        self.destinations = destinations or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> DcmQRSCP:
        hosts = "\n".join(
            f"peer{i} = ({aet}, {host}, {port})"
            for i, (aet, (host, port)) in enumerate(self.destinations.items())
        )
        config = self.workdir / "dcmqrscp.cfg"
        config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
            "VendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{self.aet} {self.storage} RW (500, 1024mb) ANY\nAETable END\n"
        )
        self._out = open(self.workdir / "dcmqrscp.log", "ab")
        self.proc = subprocess.Popen(
            ["dcmqrscp", "-c", str(config)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TCP_NODELAY="1"),
            start_new_session=True,
        )
        wait_port(self.port, 30, self.proc)
        return self

    def store(self, paths: list[Path] | Path) -> None:
        r = storescu(self.port, paths, self.aet, "LOADER")
        if r.returncode != 0:
            raise RuntimeError(f"storescu into dcmqrscp failed: {r.stderr}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if hasattr(self, "_out"):
            self._out.close()


# -- a syslog collector for the audit trail ---------------------------------------------------
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def audit_certificates(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (keys
    ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``)."""
    ca_key, ca = d / "ca.key", d / "ca.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
             str(ca), "-days", "2", "-subj", "/CN=audit test CA")  # fmt: skip
    out = {"ca": ca}
    for name in ("server", "client"):
        key, csr, cert, ext = (d / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={name}")  # fmt: skip
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            f"extendedKeyUsage={'serverAuth' if name == 'server' else 'clientAuth'}\n"
        )
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
        out[f"{name}_key"], out[f"{name}_cert"] = key, cert
    return out


class Rsyslog:
    """A Debian rsyslogd in the foreground: TLS (RFC 5425, gtls, client certificates
    required) and UDP (RFC 5426) inputs on loopback ports, every message written raw, one
    per line, to :attr:`received`."""

    def __init__(self, work: Path, certs: dict[str, Path], tls_port: int, udp_port: int) -> None:
        self.work = work
        self.received = work / "received.log"
        self.tls_port, self.udp_port = tls_port, udp_port
        work.mkdir(parents=True, exist_ok=True)
        (work / "spool").mkdir(exist_ok=True)
        self.conf = work / "rsyslog.conf"
        self.conf.write_text(
            f"""
global(maxMessageSize="64k" workDirectory="{work / "spool"}"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{certs["ca"]}"
       defaultNetstreamDriverCertFile="{certs["server_cert"]}"
       defaultNetstreamDriverKeyFile="{certs["server_key"]}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="x509/certvalid")
input(type="imtcp" port="{tls_port}" address="127.0.0.1")
module(load="imudp")
input(type="imudp" port="{udp_port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
*.* action(type="omfile" file="{self.received}" template="raw")
"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Rsyslog:
        if not Path(RSYSLOGD).exists():
            pytest.fail("rsyslogd is not installed (make install installs rsyslog rsyslog-gnutls)")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.work / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "rsyslogd.err", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.work / "rsyslogd.err").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.tls_port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def lines(self) -> list[bytes]:
        try:
            return [x for x in self.received.read_bytes().split(b"\n") if x]
        except FileNotFoundError:
            return []

    def wait_for(self, count: int, timeout: float = 30.0) -> list[bytes]:
        """The lines received, once there are ``count`` (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while len(lines := self.lines()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return lines
