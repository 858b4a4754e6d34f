"""Running the app under uvicorn: in the foreground for `tetra serve`, or on a background thread (tests,
benchmarks, notebooks, the data generator's demos) on a socket bound before start, so port 0 works.

Entry points: bind_socket(host, port), serve_forever(server, sock), BackgroundServer (a context manager).
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from tetra.errors import ConfigError
from tetra.serve.app import create_app
from tetra.serve.server import Server

STARTUP_TIMEOUT_S = 60.0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or a clear error when the address is taken or unknown."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"Cannot listen on {host}:{port} ({error.strerror or error}). Pick another --port, or "
                          "stop the process that holds it.") from None
    sock.listen(2048)
    return sock


def _uvicorn(server: Server, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(create_app(server), log_level=log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve_forever(server: Server, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), in this thread."""
    _uvicorn(server, log_level).run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(server) as url:` serves on 127.0.0.1 (a free port) until the block ends."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = bind_socket(host, port)
        self.uvicorn = _uvicorn(server, log_level)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
