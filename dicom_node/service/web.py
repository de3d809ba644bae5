"""The node's HTTP servers: a WSGI application served by waitress from a thread of its own."""

from __future__ import annotations

import logging
import threading

from flask import Flask
from waitress.server import create_server

__all__ = ["WebServer", "WebServerError"]

log = logging.getLogger("dicom_node.service.web")


class WebServerError(RuntimeError):
    """A server cannot listen (the port is taken, the host is not an address)."""


class WebServer:
    """A WSGI application on ``host:port`` (port 0: any free port), served by waitress from a
    thread: the status pages, and the viewer of the embedded PACS."""

    def __init__(
        self,
        app: Flask,
        host: str = "127.0.0.1",
        port: int = 8080,
        threads: int = 4,
        name: str = "status service",
    ) -> None:
        try:
            self._server = create_server(
                app, host=host, port=port, threads=threads, ident="dicom-node"
            )
        except OSError as exc:
            raise WebServerError(
                f"the {name} cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self.name = name
        self.host = host
        self.port = int(self._server.effective_port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.run, name=f"dicom-node-{self.name.split()[0]}", daemon=True
        )
        self._thread.start()
        log.info("%s on %s", self.name, self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listening socket and open connections, and wait for the thread."""
        server = self._server
        if self._thread is None:  # never started: only the listening socket to close
            server.close()
            return

        def close_all() -> None:
            # Runs on the server's own loop thread (waitress' trigger), where closing its
            # channels is safe; once none is left the loop returns.
            for channel in list(server._map.values()):
                channel.close()

        server.trigger.pull_trigger(close_all)
        self._thread.join(timeout)
        server.task_dispatcher.shutdown()
        self._thread = None
