"""Servers for the store benchmark, each in its own process (as deployed; no GIL shared with the client).

``raw``: the ceiling. A loopback socket that answers "send me N bytes" from one preallocated buffer and reads
N bytes into one, with an 8-byte request/ack per batch and nothing else (no framing, no store, no checksums).
``kvstore``: the real service (``run_in_thread``) with the transport under test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import struct
import threading

REQ = struct.Struct("<cQ")  # b"g"/b"p", nbytes


def _raw_serve(conn, max_bytes: int) -> None:
    from crescent.services.kvstore.dram import DramArena

    # the same memory as the store's slots (prefaulted, huge-page advised), so the ceiling is not held back
    # by page faults or TLB misses the store does not pay
    buf = DramArena(max_bytes, max_bytes, prefault=True).region(0, max_bytes)
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(f"127.0.0.1:{listener.getsockname()[1]}")

    def handle(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = bytearray(REQ.size)
        while sock.recv_into(head, REQ.size, socket.MSG_WAITALL) == REQ.size:
            op, n = REQ.unpack(head)
            if op == b"g":
                sock.sendall(buf[:n])
            else:
                got = 0
                while got < n:  # MSG_WAITALL, as the store's data server: one wake-up per batch
                    got += sock.recv_into(buf[got:n], n - got, socket.MSG_WAITALL)
                sock.sendall(b"k")
        sock.close()

    def accept() -> None:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=handle, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    conn.recv()  # until told to stop


def _store_serve(conn, settings_kwargs: dict) -> None:
    import logging

    from crescent.services.kvstore.server import freeze_startup_heap, run_in_thread
    from crescent.services.kvstore.settings import KvStoreSettings

    logging.basicConfig(level=logging.WARNING)
    # no internal token, whatever the environment says: the handshake is once per connection, not what is measured
    handle = run_in_thread(KvStoreSettings(**{"internal_token": "", "internal_token_file": "", **settings_kwargs}))
    freeze_startup_heap()  # this process is the store, as `crescent serve kvstore` is
    conn.send(handle.data_address)
    conn.recv()
    handle.stop()


def _asyncio_serve(conn, settings_kwargs: dict) -> None:
    import asyncio

    from bench.store.asyncio_server import serve
    from crescent.services.kvstore.store import BlockStore

    store = BlockStore(settings_kwargs["dram_capacity_bytes"], block_bytes=settings_kwargs["block_bytes"],
                       prefault=True)
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(f"127.0.0.1:{listener.getsockname()[1]}")
    loop = asyncio.new_event_loop()
    loop.create_task(serve(store, listener))
    threading.Thread(target=lambda: (conn.recv(), loop.call_soon_threadsafe(loop.stop)), daemon=True).start()
    loop.run_forever()
    os._exit(0)  # skip tearing down the still-pending client tasks (and their warnings)


class ServerProcess:
    """Start ``kind`` ("raw", "kvstore" or "asyncio") in a spawned process at ``address``."""

    def __init__(self, kind: str, **kwargs):
        ctx = mp.get_context("spawn")
        self._parent, child = ctx.Pipe()
        target = {"raw": _raw_serve, "kvstore": _store_serve, "asyncio": _asyncio_serve}[kind]
        args = (child, kwargs["max_bytes"]) if kind == "raw" else (child, kwargs)
        self.process = ctx.Process(target=target, args=args, daemon=True)
        self.process.start()
        if not self._parent.poll(60):
            raise RuntimeError(f"{kind} server did not start")
        self.address: str = self._parent.recv()

    def stop(self) -> None:
        try:
            self._parent.send("stop")
        except OSError:
            pass
        self.process.join(timeout=20)
        if self.process.is_alive():
            self.process.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RawClient:
    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, out: memoryview) -> None:
        self.sock.sendall(REQ.pack(b"g", len(out)))
        got = 0
        while got < len(out):
            got += self.sock.recv_into(out[got:], len(out) - got, socket.MSG_WAITALL)

    def put(self, data: memoryview) -> None:
        self.sock.sendall(REQ.pack(b"p", len(data)))
        self.sock.sendall(data)
        assert self.sock.recv(1) == b"k"

    def close(self) -> None:
        self.sock.close()
