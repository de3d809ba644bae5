"""Run the Triton Inference Server shipped in the ``nvidia-pytriton`` wheel as a child process.

The wheel carries a complete ``tritonserver`` binary, the Python backend and a backend stub
for each supported Python version, but it is laid out for PyTriton's own use. This module
turns it into a plain server over a model repository:

* the Python backend directory is copied into a writable work directory (the backend writes
  next to itself) together with the stub built for the running interpreter;
* the stub is an executable that embeds ``libpython`` and imports ``dicom_node`` and ``torch``:
  it finds ``libpython`` through ``LD_LIBRARY_PATH`` and this virtual environment's
  site-packages through the ``python3`` first on ``PATH``;
* a stub that cannot start leaves Triton waiting in "loading" for ever, so start-up is
  supervised with a deadline and the process is killed when the deadline passes.

The server runs in its own process group: the backend stubs are its children, and stopping
the group stops them too, even when the server itself died first.

Why one module of this size: it is the managed server's whole life (environment, ports,
start, readiness asked of this process, restart, stop) and the few helpers the model.py
files import, which must agree with how the server was started.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from dicom_node.inference import InferenceError
from dicom_node.service.supervisor import ChildProcess

log = logging.getLogger(__name__)

#: Lines of the server log quoted in a :class:`TritonStartError`.
_LOG_TAIL_LINES = 25
#: Log lines after which the server never becomes ready, though it keeps running: a backend
#: stub that cannot be executed (built for another Python, libpython not found).
_FATAL_LOG_LINES = ("triton_python_backend_stub: error while loading shared libraries",)


def _end_orphan(pid_file: Path) -> None:
    """End the server group a killed node left behind (its pid file names it).

    Only a process that still runs the ``tritonserver`` binary is signalled, so a pid
    reused by something else is left alone.
    """
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"tritonserver" not in cmdline.split(b"\0")[0]:
        return
    log.warning("ending Triton server %d left by a previous run", pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)


class TritonStartError(InferenceError):
    """The Triton server did not become ready; the message quotes the end of its log.

    An :class:`InferenceError`: the job runner retries later, when the server may start.
    """


def _wheel_root() -> Path:
    """Return the ``pytriton/tritonserver`` folder of the installed nvidia-pytriton wheel.

    Found without importing ``pytriton``: its package imports PyTriton's own Python API and
    that API's dependencies, none of which the server binary needs.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError(
            "nvidia-pytriton is not installed, so there is no tritonserver to start"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tritonserver"


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


class TritonServer:
    """One ``tritonserver`` process serving ``model_repository``.

    Models are loaded explicitly (``--model-control-mode=explicit``): ``models`` names them,
    ``None`` loads every model of the repository. The repository is not polled, so a model
    edited on disk changes nothing until the server restarts.

    ``env`` adds or overrides environment variables of the server and its backend stubs
    (for example a model's bundle, or ``CUDA_VISIBLE_DEVICES=""`` to keep it on the CPU).
    ``python_version`` picks the backend stub ("3.11"); it must match the interpreter whose
    site-packages the stub imports from, which is why it defaults to the running one.
    """

    def __init__(
        self,
        model_repository: Path,
        work_dir: Path,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        models: Sequence[str] | None = None,
        startup_timeout: float = 180.0,
        env: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        python_version: str | None = None,
        stop_timeout: float = 15.0,
        extra_repositories: Sequence[Path] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        #: More repositories served beside it (the models the node writes for bundles).
        self.extra_repositories = [Path(p).resolve() for p in extra_repositories]
        self.work_dir = Path(work_dir).resolve()
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.models = list(models) if models is not None else None
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.host = host
        self.python_version = python_version or _python_tag()
        self.stop_timeout = stop_timeout
        self._child: ChildProcess | None = None
        # What the server reports as its name (--id): readiness is asked of this server, not
        # of whatever answers on its ports.
        self.server_id = f"dicom_node_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        # Two servers on one host (several nodes, tests) must not share the Python backend's
        # shared-memory regions, whose names start with this prefix.
        self._shm_prefix = f"{self.server_id}_"
        # Workers may find the server dead at the same time: one of them restarts it.
        self._lock = threading.RLock()
        # Stop the server when the interpreter exits without calling stop(); a weak
        # reference so that the hook does not keep a dropped server object alive.
        ref = weakref.ref(self)
        atexit.register(_stop_if_alive, ref)

    # ----------------------------------------------------------------- public API
    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as :class:`TritonBackend` takes it."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def start(self) -> None:
        """Start the server and wait until it and its models are ready.

        Raises :class:`TritonStartError` (after killing the process) when the server exits
        or is not ready within ``startup_timeout`` seconds.
        """
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self.is_alive():
            return
        if self._child is not None:  # it died: its stubs may still run in its group
            self._kill()
        if not self.model_repository.is_dir():
            raise TritonStartError(f"model repository {self.model_repository} does not exist")
        backends = self._prepare_backends()
        self._claim_ports()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _end_orphan(self.work_dir / "tritonserver.pid")
        log.info("starting Triton on %s (log %s)", self.grpc_url, self.log_path)
        # The previous run's log is kept: it says why it died.
        self._child = ChildProcess(
            self._command(backends),
            self.log_path,
            env=self._environment(),
            cwd=self.work_dir,
            keep_previous_log=True,
        )
        self._child.start()
        # A SIGKILLed node leaves its server running; the next start ends it (see
        # _end_orphan) so that it never finds its ports held.
        (self.work_dir / "tritonserver.pid").write_text(str(self._child.pid))
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise

    def _claim_ports(self) -> None:
        """Pick free ports for those set to 0; refuse ports another program listens on.

        Without the check, a second server on the same ports fails to bind and exits while
        the first one answers the readiness probes: the node would send its volumes to a
        server that is not its own.
        """
        for attr in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, attr)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                # SO_REUSEADDR as the server sets it: connections of an earlier run still
                # in TIME_WAIT do not count, a listening socket does.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((_bind_host(self.host), port))
                except OSError as exc:
                    raise TritonStartError(
                        f"cannot start Triton: port {port} ({attr}) on {self.host} is in use "
                        f"by another program ({exc.strerror}); choose another [inference] "
                        f"{attr}, or 0 for a free one"
                    ) from None
                if port == 0:
                    setattr(self, attr, probe.getsockname()[1])

    def is_alive(self) -> bool:
        """True while the server process runs (ready or not)."""
        return self._child is not None and self._child.is_alive()

    def ensure_running(self) -> bool:
        """Restart the server if it died; return True when it had to be restarted."""
        with self._lock:
            if self.is_alive():
                return False
            if self._child is not None:
                log.warning(
                    "Triton (pid %s) exited with status %s; restarting it",
                    self._child.pid,
                    self._child.poll(),
                )
            self._start()
            return True

    def stop(self) -> None:
        """Stop the server: SIGINT for a graceful shutdown, SIGKILL after ``stop_timeout``."""
        with self._lock:
            if self._child is None:
                return
            # Whatever is left of the group (the server, stubs it could not stop) is killed.
            self._child.stop(signal.SIGINT, self.stop_timeout)
            self._cleaned_up()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- internals
    def _prepare_backends(self) -> Path:
        """Copy the Python backend and the matching stub into ``work_dir/backends`` once."""
        wheel = _wheel_root()
        backends = self.work_dir / "backends"
        stub_name = "triton_python_backend_stub"
        stub = wheel / "python_backend_stubs" / self.python_version / stub_name
        if not stub.is_file():
            raise TritonStartError(
                f"nvidia-pytriton has no Python backend stub for Python {self.python_version}"
            )
        target = backends / "python" / stub_name
        if not (backends / "python" / "libtriton_python.so").is_file():
            shutil.copytree(wheel / "backends", backends, dirs_exist_ok=True)
        if not target.is_file() or target.stat().st_size != stub.stat().st_size:
            shutil.copy2(stub, target)
        return backends

    def _command(self, backends: Path) -> list[str]:
        binary = _wheel_root() / "bin" / "tritonserver"
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            *(f"--model-repository={p}" for p in self.extra_repositories),
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            # Every config is complete. Otherwise the Python backend starts one stub per model
            # only to ask its TritonPythonModel for a config (importing torch and MONAI, ~2.5 s
            # of CPU each), then another to serve it.
            "--disable-auto-complete-config",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout) - 2)}",
            "--log-verbose=0",
            f"--id={self.server_id}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            # Volumes are tens to hundreds of MB: grow the stub's shared memory in large
            # steps rather than the default 1 MiB ones.
            "--backend-config=python,shm-growth-byte-size=67108864",
        ]
        if self.host in ("127.0.0.1", "localhost"):
            cmd += ["--grpc-address=127.0.0.1", "--http-address=127.0.0.1"]
        else:
            cmd += [f"--grpc-address={self.host}", f"--http-address={self.host}"]
        for model in self.models if self.models is not None else ["*"]:
            cmd.append(f"--load-model={model}")
        return cmd

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The wheel's own copies of the libraries the server links against, beside the
        # pytriton package wherever the wheel was installed.
        libs = [str(_wheel_root().parent.parent / "nvidia_pytriton.libs")]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libs.append(libdir)  # libpython3.X.so.1.0, which the stub links against
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        # The stub runs the first python3 on PATH to find the site-packages to import from.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        # It ignores PYTHONPATH: the repository's model.py files put these first on sys.path,
        # so that they import this dicom_node and whatever PYTHONPATH adds here.
        paths = [str(Path(__file__).resolve().parents[2])]
        paths += [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["DICOM_NODE_PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.update(self.env)
        return env

    def _wait_ready(self) -> None:
        """Poll the gRPC health endpoints until the server and its models are ready.

        gRPC, the protocol the node's requests use, so that a client needs no HTTP stack.
        """
        import tritonclient.grpc as grpcclient

        assert self._child is not None
        deadline = time.monotonic() + self.startup_timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while True:
                code = self._child.poll()
                if code is not None:
                    raise TritonStartError(
                        f"Triton exited with status {code} while starting; "
                        f"end of {self.log_path}:\n{self.log_tail()}"
                    )
                if self._ready(client):
                    log.info("Triton ready on %s", self.grpc_url)
                    return
                tail = self.log_tail()
                if any(line in tail for line in _FATAL_LOG_LINES):
                    raise TritonStartError(
                        f"a Triton backend stub cannot start; end of {self.log_path}:\n{tail}"
                    )
                if time.monotonic() > deadline:
                    raise TritonStartError(
                        f"Triton was not ready within {self.startup_timeout:.0f} s "
                        f"(a backend stub that cannot start makes it wait for ever); "
                        f"end of {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.25)
        finally:
            client.close()

    def _ready(self, client) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            if not client.is_server_ready(client_timeout=2.0):
                return False
            name = client.get_server_metadata(client_timeout=2.0).name
            if name != self.server_id:
                raise TritonStartError(
                    f"another Triton server ({name!r}) answers on {self.grpc_url}, not the one "
                    f"this node started"
                )
            return all(client.is_model_ready(m, client_timeout=2.0) for m in self.models or [])
        except (InferenceServerException, OSError):
            return False  # not listening yet

    def _kill(self) -> None:
        """Kill the server's group (the server and its backend stubs) and clean up."""
        if self._child is not None:
            self._child.kill(self.stop_timeout)
        self._cleaned_up()

    def _cleaned_up(self) -> None:
        """A server or stub that was killed leaves the Python backend's regions behind."""
        self._child = None
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)


def _stop_if_alive(ref: weakref.ref[TritonServer]) -> None:
    """At exit: stop the server if its object still exists."""
    server = ref()
    if server is not None:
        server.stop()


def _bind_host(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host
