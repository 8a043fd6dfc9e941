"""The kvstore's framed data protocol (the ``tcp`` transport, and the ``mooncake`` transport's control
channel).

Every frame is a fixed header, a body of small per-block arrays, then a payload of raw block bytes:

    header  <4sBBHIIQ: magic b"CKV1", op, status, reserved, n_blocks, body_len, payload_len
    body    op-specific arrays (little-endian numpy), length body_len
    payload the blocks (each block's metadata then its bytes), length payload_len

A GET reply's payload is followed by a trailer of one byte per block (1 = the block passed its checksum, which
the server checks while sending). A request body names the blocks: model id, layer range, hashes, and for puts
each block's size and metadata length. Payload bytes go straight between sockets and the store's arena
(``recv_into`` a reserved slot, ``sendmsg`` from a pinned slot), so the data path has no Python-level copies.
Limits are checked before anything is allocated; a frame that breaks them is answered with an error and the
connection is closed (its framing can no longer be trusted), while errors about the blocks themselves (sizes,
keys) leave the connection usable.

A store with an internal token requires it in the first frame of every connection: AUTH, body = the token. Any
other first frame, or a wrong token, is answered with an error and the connection closed, before the frame's body
(and so any block) is read. Once per connection: the data path itself is unchanged.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass

import numpy as np

from crescent.services.common.auth import token_matches
from crescent.services.kvstore.blocks import MAX_MODEL_ID_BYTES
from crescent.settings import MAX_INTERNAL_TOKEN_CHARS

MAGIC = b"CKV1"
HEADER = struct.Struct("<4sBBHIIQ")
MAX_BLOCKS = 1 << 16
MAX_BODY_BYTES = 16 << 20
MAX_PAYLOAD_BYTES = 8 << 30
MAX_TOKEN_BYTES = MAX_INTERNAL_TOKEN_CHARS  # an AUTH body longer than this is refused unread
WHOLE_BLOCK = (0, 0xFFFFFFFF)  # the layer range of a block stored whole (no per-layer split)
ANY_LAYERS = (0, 0)  # LOOKUP only: a block counts when any of its layer ranges is stored


class Op(enum.IntEnum):
    NONE = 0          # error replies to frames whose op could not be read
    PUT = 1
    GET = 2
    LOOKUP = 3
    MC_INFO = 10      # mooncake: the server's transfer-engine session
    MC_GET = 11       # mooncake: pin blocks, return their arena addresses and a lease
    MC_PUT = 12       # mooncake: reserve slots, return their addresses and a lease
    MC_COMMIT = 13    # mooncake: the client wrote the reserved slots; checksum and publish them
    MC_RELEASE = 14   # mooncake: the client read the pinned blocks; unpin them
    AUTH = 20         # the connection's first frame when the store has an internal token: body = the token


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


class BlockStatus(enum.IntEnum):
    MISS = 0
    HIT = 1       # get: served; put: stored now
    EXISTS = 2    # put: already stored (content-addressed), the bytes were discarded
    FULL = 3      # put: every slot is held by in-flight transfers
    ERROR = 4


class ProtocolError(ValueError):
    """A malformed frame or a request that breaks the protocol's limits."""


@dataclass
class BlockRequest:
    model_id: str
    layer_start: int
    layer_end: int
    hashes: np.ndarray                 # uint64 [n]
    sizes: np.ndarray | None = None    # uint64 [n], puts only
    meta_lens: np.ndarray | None = None  # uint32 [n], puts only

    def encode(self) -> bytes:
        model = self.model_id.encode()
        n = len(self.hashes)
        sizes = self.sizes if self.sizes is not None else np.zeros(n, np.uint64)
        metas = self.meta_lens if self.meta_lens is not None else np.zeros(n, np.uint32)
        return b"".join([struct.pack("<HII", len(model), self.layer_start, self.layer_end), model,
                         np.ascontiguousarray(self.hashes, np.uint64).tobytes(),
                         np.ascontiguousarray(sizes, np.uint64).tobytes(),
                         np.ascontiguousarray(metas, np.uint32).tobytes()])

    @classmethod
    def decode(cls, body: bytes | memoryview, n: int) -> BlockRequest:
        if len(body) < 10:
            raise ProtocolError("request body too short")
        model_len, start, end = struct.unpack_from("<HII", body)
        if model_len > MAX_MODEL_ID_BYTES:
            raise ProtocolError(f"model id longer than {MAX_MODEL_ID_BYTES} bytes")
        if len(body) != 10 + model_len + n * 20:
            raise ProtocolError(f"request body of {len(body)} bytes does not match {n} blocks")
        try:
            model_id = bytes(body[10 : 10 + model_len]).decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("model id is not UTF-8") from exc
        at = 10 + model_len
        hashes = np.frombuffer(body, np.uint64, n, at)
        sizes = np.frombuffer(body, np.uint64, n, at + 8 * n)
        metas = np.frombuffer(body, np.uint32, n, at + 16 * n)
        return cls(model_id, start, end, hashes, sizes, metas)


def pack_header(op: int, n_blocks: int, body_len: int, payload_len: int, status: int = Status.OK) -> bytes:
    return HEADER.pack(MAGIC, op, status, 0, n_blocks, body_len, payload_len)


def unpack_header(raw: bytes | memoryview) -> tuple[Op, Status, int, int, int]:
    """(op, status, n_blocks, body_len, payload_len); ProtocolError on a malformed or oversized frame."""
    magic, op, status, _, n, body_len, payload_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a crescent kvstore frame")
    try:
        op, status = Op(op), Status(status)
    except ValueError as exc:
        raise ProtocolError(f"unknown op {op} or status {status}") from exc
    if n > MAX_BLOCKS or body_len > MAX_BODY_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"frame over limits: {n} blocks (max {MAX_BLOCKS}), body {body_len} bytes "
                            f"(max {MAX_BODY_BYTES}), payload {payload_len} bytes (max {MAX_PAYLOAD_BYTES})")
    return op, status, n, body_len, payload_len


def set_io_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Kernel-level send/receive timeouts on a *blocking* socket (None = wait forever).

    Python's own ``settimeout`` makes the socket non-blocking and polls before every call, which splits large
    transfers into many small recv/send calls; SO_RCVTIMEO/SO_SNDTIMEO keep each call one big blocking syscall
    that fails with EAGAIN (raised as ``TimeoutError`` by :func:`recv_into_exact`/:func:`send_all`) when
    stalled.
    """
    sec = 0.0 if seconds is None else max(seconds, 0.001)
    tv = struct.pack("ll", int(sec), int((sec % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if the peer goes away first.

    MSG_WAITALL: the kernel wakes the thread once the whole view is in (or on EOF, an error or the
    SO_RCVTIMEO timeout, after which the loop goes on or fails), instead of once per arriving segment train:
    fewer syscalls and GIL hand-offs per received MiB."""
    got, total = 0, len(view)
    while got < total:
        try:
            n = sock.recv_into(view[got:], total - got, socket.MSG_WAITALL)
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise TimeoutError(f"receive timed out after {got} of {total} bytes") from exc
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {total} bytes")
        got += n


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    recv_into_exact(sock, memoryview(buf))
    return buf


def send_all(sock: socket.socket, parts: list) -> None:
    """Send ``parts`` back to back with sendmsg (scatter-gather: no join, no copy), resuming partial sends."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    at = 0  # first view not fully sent (an index: popping the front of a long list is quadratic)
    while at < len(views):
        try:
            sent = sock.sendmsg(views[at : at + 512])  # IOV_MAX is 1024 on Linux
        except BlockingIOError as exc:  # SO_SNDTIMEO expired
            raise TimeoutError("send timed out") from exc
        while at < len(views) and sent >= len(views[at]):
            sent -= len(views[at])
            at += 1
        if sent:
            views[at] = views[at][sent:]


def drain(sock: socket.socket, size: int, scratch: memoryview) -> None:
    """Read and discard ``size`` bytes (a refused block's payload), keeping the stream in frame."""
    while size > 0:
        chunk = scratch[: min(size, len(scratch))]
        recv_into_exact(sock, chunk)
        size -= len(chunk)


def auth_frame(token: str) -> list[bytes]:
    body = token.encode()
    return [pack_header(Op.AUTH, 0, len(body), 0), body]


def check_auth(sock: socket.socket, token: str) -> tuple[Op, str]:
    """Read a connection's first frame and check that it is AUTH with ``token``: (its op, why it is refused; ''
    = accepted). Only an AUTH frame's body is read; ProtocolError on a malformed header."""
    op, _, _, body_len, payload_len = unpack_header(recv_exact(sock, HEADER.size))
    if op != Op.AUTH or payload_len or body_len > MAX_TOKEN_BYTES:
        return op, ("this kvstore needs the internal token: a connection's first frame must be AUTH (set the "
                    "client's internal_token)")
    if not token_matches(bytes(recv_exact(sock, body_len)), token):
        return op, "wrong internal token"
    return op, ""


def send_error(sock: socket.socket, op: int, message: str) -> None:
    body = message.encode()[:4096]
    send_all(sock, [pack_header(op, 0, len(body), 0, Status.ERROR), body])
