"""Forwarders that tests put between a client and a real server, to inject network faults.

``TcpProxy`` makes a server (PostgreSQL) vanish and come back; ``HttpFaultProxy`` fails or stalls the first
requests to an HTTP server (the moto S3 server) and forwards the rest.

``TcpProxy(("127.0.0.1", 5432))`` listens on a free local port and forwards every connection to the target.
``down()`` closes the listener and cuts every open connection (clients get "connection refused" or a reset, as
when the server's host goes away); ``blackhole()`` accepts connections but never answers (a hung network);
``up()`` forwards again on the same port. The shared server itself is never touched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.host = "127.0.0.1"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._mode = "down"
        with socket.socket() as probe:
            probe.bind((self.host, 0))
            self.port = probe.getsockname()[1]
        self.up()

    # -- control ----------------------------------------------------------------------------------------------------

    def up(self) -> None:
        self._cut()
        self._mode = "forward"
        self._listen()

    def blackhole(self) -> None:
        self._cut()
        self._mode = "blackhole"
        self._listen()

    def down(self) -> None:
        self._mode = "down"
        self._cut()

    def close(self) -> None:
        self.down()

    # -- internals --------------------------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener, self._mode), daemon=True).start()

    def _cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        for sock in [*sockets, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept(self, listener: socket.socket, mode: str) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by _cut()
            self._track(client)
            if mode == "blackhole":
                continue  # hold the connection open and never answer
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._track(server)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class HttpFaultProxy:
    """An HTTP endpoint in front of a real server (moto S3) that fails the first ``faults`` connections.

    A faulted connection has its request head read, then either gets ``503 SlowDown`` (an S3-style throttling
    error) and is closed, or, with ``stall_s``, gets no answer at all for that long (a read timeout on the
    client). Every later connection is forwarded untouched. A client that is answered 503 closes the connection,
    so each retry arrives on a new one: ``faulted`` lists the request lines that were failed, in order.
    """

    BODY = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>injected</Message></Error>"

    def __init__(self, target: tuple[str, int], *, faults: int, stall_s: float = 0.0) -> None:
        self.target = target
        self.faults = faults
        self.stall_s = stall_s
        self.faulted: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()

    def _take_fault(self) -> bool:
        with self._lock:
            if self.faults <= 0:
                return False
            self.faults -= 1
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if not self._take_fault():
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                return
            server.settimeout(None)
            threading.Thread(target=TcpProxy._pump, args=(client, server), daemon=True).start()
            TcpProxy._pump(server, client)
            return
        with client:
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head and (data := client.recv(65536)):
                    head += data
            with self._lock:
                self.faulted.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            if self.stall_s:
                time.sleep(self.stall_s)
                return
            response = (
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(self.BODY)}\r\nConnection: close\r\n\r\n".encode()
                + self.BODY
            )
            with contextlib.suppress(OSError):
                client.sendall(response)
                client.shutdown(socket.SHUT_RDWR)
