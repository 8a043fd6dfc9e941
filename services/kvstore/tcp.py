"""The ``tcp`` transport's client: batched gets and puts of many blocks per round trip over one socket.

A put is one ``sendmsg`` of header, body and every block's memoryview (no join); a get reads the whole payload
with ``recv_into`` into one buffer (the caller's ``out`` when given, so repeated gets reuse memory) and hands
back memoryviews into it.
"""

from __future__ import annotations

import socket

import numpy as np

from crescent.services.kvstore import wire as p
from crescent.services.kvstore.blocks import checksum
from crescent.services.kvstore.transport import (
    FetchedBlock,
    ServerError,
    Transfer,
    TransferError,
    TransportClient,
)

HIT = int(p.BlockStatus.HIT)


class FramedConnection:
    """A lazily (re)connected socket to the data server; shared by the tcp and mooncake clients."""

    def __init__(self, host: str, port: int, timeout_s: float, token: str = ""):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.token = token  # the store's internal token, sent once per connection ('' = none)
        self.sock: socket.socket | None = None

    def get(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            try:
                sock.settimeout(None)  # blocking, with kernel timeouts: big transfers stay single syscalls
                p.set_io_timeout(sock, self.timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.token:
                    _authenticate(sock, self.token)
            except BaseException:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def shutdown(self) -> None:
        """Unblock a call in progress (from another thread); the owner then drops the connection."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(
        self, op: p.Op, count: int, body: bytes, payload: list, payload_len: int
    ) -> tuple[int, bytearray]:
        """Send one frame and read the reply's header and body: (payload_len, body). ServerError on an error
        reply."""
        sock = self.get()
        p.send_all(sock, [p.pack_header(op, count, len(body), payload_len), body, *payload])
        head = p.recv_exact(sock, p.HEADER.size)
        _, status, _, body_len, reply_payload = p.unpack_header(head)
        reply = p.recv_exact(sock, body_len)
        if status == p.Status.ERROR:
            raise ServerError(f"kvstore refused {op.name}: {reply.decode(errors='replace')}")
        return reply_payload, reply


def _authenticate(sock: socket.socket, token: str) -> None:
    p.send_all(sock, p.auth_frame(token))
    _, status, _, body_len, _ = p.unpack_header(p.recv_exact(sock, p.HEADER.size))
    reply = p.recv_exact(sock, body_len)
    if status == p.Status.ERROR:
        raise ServerError(f"kvstore refused the connection: {reply.decode(errors='replace')}")


def split_payload(reply: bytearray, count: int, buf: memoryview, verify: bool) -> list[FetchedBlock | None]:
    """Cut a GET payload (each hit's metadata then bytes) into per-block views; bad checksums become
    misses."""
    statuses = np.frombuffer(reply, np.uint8, count, 0)
    sizes = np.frombuffer(reply, np.uint64, count, count).astype(np.int64)
    crcs = np.frombuffer(reply, np.uint32, count, 9 * count).tolist()
    meta_lens = np.frombuffer(reply, np.uint32, count, 13 * count).astype(np.int64)
    hit = statuses == HIT
    ends = np.cumsum((sizes + meta_lens) * hit)  # where each hit's bytes end in the payload (misses add none)
    starts = (ends - sizes).tolist()  # where each hit's bytes begin (after its metadata)
    metas = [b""] * count
    if meta_lens.any():
        metas = [bytes(buf[a - m : a]) if m else b"" for a, m in zip(starts, meta_lens.tolist(), strict=True)]
    # plain lists and one comprehension: at 64 KiB blocks a batch is hundreds of blocks
    out = [FetchedBlock(buf[a:e], m) if h else None
           for h, a, e, m in zip(hit.tolist(), starts, ends.tolist(), metas, strict=True)]
    if verify:
        out = [b if b is None or checksum(b.data, b.meta) == crc else None
               for b, crc in zip(out, crcs, strict=True)]
    return out


def run_transfer(client: TransportClient, conn: FramedConnection, op: str, body):
    """Run ``body(transfer)`` as ``client``'s current :class:`Transfer`; any failure drops the connection."""
    client.current = Transfer(client.name, op, conn.timeout_s, on_abort=conn.shutdown)
    try:
        return client.current.run(body)
    except TransferError:
        conn.drop()
        raise
    finally:
        client.current = None


def lookup_over(
    client: TransportClient,
    conn: FramedConnection,
    model_id: str,
    layer_range: tuple[int, int],
    hashes: list[int],
) -> tuple[int, list[int]]:
    req = p.BlockRequest(model_id, *layer_range, np.array(hashes, np.uint64))

    def body(t: Transfer) -> tuple[int, list[int]]:
        _, reply = conn.request(p.Op.LOOKUP, len(hashes), req.encode(), [], 0)
        if len(reply) != len(hashes) + 4:
            raise TransferError("lookup reply does not match the request")
        return int(np.frombuffer(reply, np.uint32, 1, len(hashes))[0]), list(reply[: len(hashes)])

    return run_transfer(client, conn, "lookup", body)


class TcpTransport(TransportClient):
    name = "tcp"

    def __init__(self, host: str, port: int, timeout_s: float = 30.0, verify_checksums: bool = False,
                 token: str = ""):
        super().__init__()
        self.conn = FramedConnection(host, port, timeout_s, token)
        self.verify_checksums = verify_checksums  # the server verifies on every read; this adds end-to-end

    def put(self, model_id, layer_range, hashes, blocks, metas) -> list[int]:
        sizes = np.array([len(b) for b in blocks], np.uint64)
        meta_lens = np.array([len(m) for m in metas], np.uint32)
        req = p.BlockRequest(model_id, *layer_range, np.array(hashes, np.uint64), sizes, meta_lens)
        # each block's metadata goes before its bytes; a batch without any sends just the blocks (half the
        # iovecs, and no per-block pair to build at 64 KiB blocks)
        parts = [x for pair in zip(metas, blocks, strict=True) for x in pair] if any(metas) else list(blocks)
        payload_len = int(sizes.sum() + meta_lens.sum())

        def body(t: Transfer) -> list[int]:
            _, reply = self.conn.request(p.Op.PUT, len(hashes), req.encode(), parts, payload_len)
            if len(reply) != len(hashes):
                raise TransferError("put reply does not match the request")
            return list(reply)

        return self._run("put", body)

    def get(self, model_id, layer_range, hashes, out=None) -> list[FetchedBlock | None]:
        req = p.BlockRequest(model_id, *layer_range, np.array(hashes, np.uint64))
        count = len(hashes)

        def body(t: Transfer) -> list[FetchedBlock | None]:
            payload_len, reply = self.conn.request(p.Op.GET, count, req.encode(), [], 0)
            if len(reply) != 17 * count:
                raise TransferError("get reply does not match the request")
            if out is not None and len(out) < payload_len:
                raise TransferError(
                    f"out buffer of {len(out)} bytes is smaller than the {payload_len}-byte reply"
                )
            buf = out[:payload_len] if out is not None else memoryview(bytearray(payload_len))
            p.recv_into_exact(self.conn.get(), buf)
            passed = p.recv_exact(self.conn.get(), count)  # the server's checksum verdict per block
            blocks = split_payload(reply, count, buf, self.verify_checksums)
            return [b if ok else None for b, ok in zip(blocks, passed, strict=True)]

        return self._run("get", body)

    def lookup(self, model_id, layer_range, hashes) -> tuple[int, list[int]]:
        return lookup_over(self, self.conn, model_id, layer_range, hashes)

    def _run(self, op: str, body):
        return run_transfer(self, self.conn, op, body)

    def close(self) -> None:
        self.conn.drop()
