"""The bulk data server: one thread per client connection, speaking :mod:`protocol` against a
:class:`BlockStore`.

Threads rather than asyncio: every byte moves in ``recv_into``/``sendmsg``/``crc32c`` calls that release the
GIL, so threads overlap them with no event-loop hop per chunk (bench/store measures both server kinds). A
client that sends a malformed frame gets an error and is disconnected; one that disconnects mid-transfer has
its reservations aborted and its leases released, so no half-written block is ever published and nothing stays
pinned.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import repeat

import numpy as np

from crescent.services.common import metrics
from crescent.services.kvstore import wire as p
from crescent.services.kvstore.blocks import MAX_META_BYTES, BlockKey, crc_update
from crescent.services.kvstore.crc_pipeline import verify_all
from crescent.services.kvstore.small_puts import SmallBlockPut
from crescent.services.kvstore.store import BlockStore, Lease, Reservation, StoreFullError

log = logging.getLogger(__name__)

SCRATCH_BYTES = 1 << 20
HIT = int(p.BlockStatus.HIT)
# label children resolved once: labels() costs more than the inc() on the data path
_PUT_OK = metrics.STORE_OPS.labels("put", "ok")
_GET_HIT = metrics.STORE_OPS.labels("get", "hit")
_GET_MISS = metrics.STORE_OPS.labels("get", "miss")
# a big block is received and checksummed this much at a time (1 MiB measured best against 4 MiB: 0.80-0.84
# of the raw socket at 16 MiB blocks against 0.65-0.69)
BIG_BLOCK_RECV = 1 << 20
SMALL_BLOCK_BYTES = 1 << 20  # a batch of blocks without metadata up to this size takes the small-block path


class Session:
    """One client connection's state: its socket and the leases/reservations it holds (mooncake)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.scratch = memoryview(bytearray(SCRATCH_BYTES))
        self.leases: dict[int, list[Lease]] = {}
        self.reservations: dict[int, list[Reservation | None]] = {}
        self.ids = itertools.count(1)
        self.busy = False  # a request is being served (a draining server waits for it)
        # one helper thread per connection: it verifies a GET's blocks while the socket thread sends them, and
        # reserves a long put's next run while this one arrives (crc32c and socket calls release the GIL)
        self.helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-helper")


class DataServer:
    """Listens on ``host:port`` (0 = a free port) and serves until :meth:`stop`."""

    def __init__(self, store: BlockStore, host: str, port: int, transport: str = "tcp", mooncake=None,
                 io_timeout_s: float = 30.0, internal_token: str = ""):
        self.store = store
        self.internal_token = internal_token  # '' = any client; else every connection opens with AUTH
        # a client stalled mid-frame is dropped after this (idle ones are not)
        self.io_timeout_s = io_timeout_s
        self.transport = transport
        self.mooncake = mooncake  # MooncakeExport when transport == "mooncake"
        self.listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self._stopping = threading.Event()
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="kvstore-accept", daemon=True)
        self._handlers = {p.Op.PUT: self._put, p.Op.GET: self._get, p.Op.LOOKUP: self._lookup,
                          p.Op.AUTH: self._auth_again}
        if mooncake is not None:
            self._handlers.update(mooncake.handlers(self))

    def start(self) -> DataServer:
        self._thread.start()
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, give in-flight requests ``grace_s`` to finish, then close every connection."""
        self._stopping.set()
        self.listener.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(s.busy or s.leases or s.reservations
                                                  for s in list(self._sessions)):
            time.sleep(0.01)
        with self._lock:
            for session in self._sessions:
                _close(session.sock)

    @property
    def active_connections(self) -> int:
        return len(self._sessions)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = Session(sock)
            with self._lock:
                self._sessions.add(session)
            threading.Thread(target=self._serve, args=(session,), name="kvstore-conn", daemon=True).start()

    def _serve(self, session: Session) -> None:
        try:
            if self.internal_token and not self._authenticate(session):
                return
            while self._handle_one(session):
                pass
        except (ConnectionError, TimeoutError, OSError) as exc:
            if not self._stopping.is_set():
                metrics.STORE_CLIENT_ERRORS.labels("disconnect").inc()
                log.info("client disconnected: %s", exc)
        finally:
            self._cleanup(session)

    def _authenticate(self, session: Session) -> bool:
        """Read the connection's first frame: AUTH with the token, or the connection is refused and closed before
        any other frame's body (or block) is read."""
        p.set_io_timeout(session.sock, self.io_timeout_s)  # a stranger that connects and says nothing is dropped
        try:
            op, refused = p.check_auth(session.sock, self.internal_token)
        except p.ProtocolError as exc:
            return self._refuse(session, 0, "bad_frame", str(exc))
        if refused:
            return self._refuse(session, op, "unauthenticated", refused)
        p.send_all(session.sock, [p.pack_header(p.Op.AUTH, 0, 0, 0)])
        return True

    def _auth_again(self, session: Session, op: p.Op, count: int, body: bytearray, payload_len: int) -> None:
        """AUTH after the first frame, or to a store without a token (a client configured before its store):
        nothing to check, answered OK."""
        if payload_len:
            raise p.ProtocolError("an AUTH frame carries no payload")
        p.send_all(session.sock, [p.pack_header(op, 0, 0, 0)])

    def _handle_one(self, session: Session) -> bool:
        """Serve one request; False to close the connection (clean EOF or a malformed frame)."""
        sock = session.sock
        head = bytearray(p.HEADER.size)
        p.set_io_timeout(sock, None)  # an idle client may wait between requests as long as it likes
        n = sock.recv_into(head)
        if n == 0:
            return False
        p.set_io_timeout(sock, self.io_timeout_s)
        session.busy = True
        try:
            return self._handle_request(session, head, n)
        finally:
            session.busy = False

    def _handle_request(self, session: Session, head: bytearray, n: int) -> bool:
        sock = session.sock
        if n < len(head):
            p.recv_into_exact(sock, memoryview(head)[n:])
        try:
            op, _, count, body_len, payload_len = p.unpack_header(head)
        except p.ProtocolError as exc:
            return self._refuse(session, 0, "bad_frame", str(exc))
        body = p.recv_exact(sock, body_len)
        if self._stopping.is_set() and op not in (p.Op.MC_COMMIT, p.Op.MC_RELEASE):
            # draining: finish what clients hold (commit, release), refuse anything new
            return self._refuse(session, op, "draining", "kvstore is draining; use another instance")
        started = time.perf_counter()
        handler = self._handlers.get(op)
        if handler is None:
            return self._refuse(session, op, "bad_frame", f"op {op.name} is not served over {self.transport}")
        try:
            handler(session, op, count, body, payload_len)
        except p.ProtocolError as exc:
            return self._refuse(session, op, "bad_frame", str(exc))
        except (ConnectionError, TimeoutError, OSError):
            raise
        except Exception as exc:  # a bug must cost this client its connection, never the server
            log.exception("internal error serving %s", op.name)
            return self._refuse(session, op, "internal", f"internal error: {exc}")
        elapsed = time.perf_counter() - started
        metrics.STORE_TRANSFER_SECONDS.labels(self.transport, op.name.lower()).observe(elapsed)
        return True

    def _refuse(self, session: Session, op: int, kind: str, message: str) -> bool:
        metrics.STORE_CLIENT_ERRORS.labels(kind).inc()
        log.warning("refusing client request: %s", message)
        try:
            p.send_error(session.sock, op, message)
        except OSError:
            pass
        return False

    # --- ops
    # --------------------------------------------------------------------------------------------------
    def _put(self, session: Session, op: p.Op, count: int, body: bytearray, payload_len: int) -> None:
        req = p.BlockRequest.decode(body, count)
        sizes, metas = req.sizes.astype(np.int64), req.meta_lens.astype(np.int64)
        if int(sizes.sum() + metas.sum()) != payload_len:
            raise p.ProtocolError(f"payload of {payload_len} bytes does not match the block sizes")
        error = self.validate_blocks(req)
        if error:
            p.drain(session.sock, payload_len, session.scratch)
            metrics.STORE_OPS.labels("put", "error").inc(count)
            p.send_error(session.sock, op, error)
            return
        statuses = np.zeros(count, np.uint8)
        if count > 1 and not metas.any() and int(sizes.max()) <= SMALL_BLOCK_BYTES:
            SmallBlockPut(self.store, session.sock, session.scratch, session.helper).run(
                self.keys(req), sizes.tolist(), statuses)
        else:
            keys = self.keys(req)
            for i in range(count):
                meta = bytes(p.recv_exact(session.sock, int(metas[i]))) if metas[i] else b""
                statuses[i] = self._put_one(session, keys[i], int(sizes[i]), meta)
        stored = int(np.count_nonzero(statuses == p.BlockStatus.HIT))
        metrics.STORE_BYTES_IN.labels(self.transport).inc(payload_len)
        _PUT_OK.inc(stored)
        p.send_all(session.sock, [p.pack_header(op, count, count, 0), statuses.tobytes()])
        # answered: make room for a batch like this one now, while this client prepares its next request
        self.store.keep_free(stored)

    def _put_one(self, session: Session, key: BlockKey, size: int, meta: bytes) -> int:
        """Receive one block (a big one, or one with metadata) into its slot and publish it: checksummed a
        chunk at a time right after each chunk lands, while it is in cache and the client goes on sending into
        the socket's buffer. A block cut off mid-way is never published."""
        try:
            reservation = self.store.reserve(key, size, meta)
        except StoreFullError:
            p.drain(session.sock, size, session.scratch)
            return p.BlockStatus.FULL
        if reservation is None:
            p.drain(session.sock, size, session.scratch)
            return p.BlockStatus.EXISTS
        crc = crc_update(meta)  # == blocks.checksum(view, meta) once every chunk is in
        try:
            for start in range(0, size, BIG_BLOCK_RECV):
                chunk = reservation.view[start : start + BIG_BLOCK_RECV]
                p.recv_into_exact(session.sock, chunk)
                crc = crc_update(chunk, crc)
        except BaseException:
            self.store.abort(reservation)  # a half-received block is never published
            raise
        self.store.commit(reservation, crc)
        return p.BlockStatus.HIT

    def _get(self, session: Session, op: p.Op, count: int, body: bytearray, payload_len: int) -> None:
        req = p.BlockRequest.decode(body, count)
        error = self.validate_blocks(req, sizes=False)
        if error:
            p.send_error(session.sock, op, error)
            return
        leases = self.acquire_all(req, verify=False)
        check: Future | None = None
        try:
            # every block is checked while it is being sent; the trailer tells the client which passed, and a
            # block that failed is dropped here and is a miss there: corrupt bytes are never handed on as a
            # hit
            statuses, sizes, crcs, meta_lens, parts = _describe(leases, self.store.arena)
            payload = int(sizes.sum() + meta_lens.sum())
            head = p.pack_header(op, count, count * 17, payload)
            # submitted only now: the checking thread then takes the GIL while this one waits in sendmsg, not
            # while it still has Python work to do
            check = session.helper.submit(verify_all, self.store, leases)
            p.send_all(session.sock, [head, statuses, sizes, crcs, meta_lens, *parts])
            trailer = np.array(check.result(), np.uint8)
            p.send_all(session.sock, [trailer])
            metrics.STORE_BYTES_OUT.labels(self.transport).inc(payload)
        finally:
            if check is not None:
                check.exception()  # wait: a check must not read a slot after its lease is released
            self.store.release_many(leases)

    def _lookup(self, session: Session, op: p.Op, count: int, body: bytearray, payload_len: int) -> None:
        req = p.BlockRequest.decode(body, count)
        prefix, tiers = self.store.lookup(
            req.model_id, [int(h) for h in req.hashes], (req.layer_start, req.layer_end)
        )
        metrics.STORE_OPS.labels("lookup", "ok").inc()
        out = np.array([int(t) for t in tiers], np.uint8).tobytes() + np.uint32(prefix).tobytes()
        p.send_all(session.sock, [p.pack_header(op, count, len(out), 0), out])

    # --- helpers shared with the mooncake control ops -----------------------------------------------------
    @staticmethod
    def key(req: p.BlockRequest, i: int) -> BlockKey:
        return BlockKey(req.model_id, int(req.hashes[i]), req.layer_start, req.layer_end)

    @staticmethod
    def keys(req: p.BlockRequest) -> list[BlockKey]:
        """Every block's key, built in C (a per-block Python constructor shows in 64 KiB-block profiles)."""
        return list(map(BlockKey._make, zip(repeat(req.model_id), req.hashes.tolist(), repeat(req.layer_start),
                                            repeat(req.layer_end))))

    def validate_blocks(self, req: p.BlockRequest, sizes: bool = True) -> str:
        """Why these blocks cannot be stored or read (empty if they can); the connection stays usable."""
        if not 0 <= req.layer_start < req.layer_end:
            return f"bad layer range [{req.layer_start}, {req.layer_end}): need 0 <= start < end"
        if sizes and len(req.sizes):
            limit = self.store.block_bytes or int(req.sizes[0])
            if int(req.sizes.min()) <= 0 or int(req.sizes.max()) > limit:
                return f"block sizes must be in (0, {limit}] bytes for this store"
            if int(req.meta_lens.max()) > MAX_META_BYTES:
                return f"block metadata over {MAX_META_BYTES} bytes"
        return ""

    def acquire_all(self, req: p.BlockRequest, verify: bool = True) -> list[Lease | None]:
        leases = self.store.acquire_many(self.keys(req), verify)
        hits = sum(lease is not None for lease in leases)
        _GET_HIT.inc(hits)
        _GET_MISS.inc(len(leases) - hits)
        return leases

    def _cleanup(self, session: Session) -> None:
        for leases in session.leases.values():
            for lease in leases:
                if lease is not None:
                    self.store.release(lease)
        for reservations in session.reservations.values():
            for reservation in reservations:
                if reservation is not None:
                    self.store.abort(reservation)
        session.leases.clear()
        session.reservations.clear()
        session.helper.shutdown(wait=False)
        _close(session.sock)
        with self._lock:
            self._sessions.discard(session)


def _describe(leases: list[Lease | None], arena):
    """Per-block status, size, crc, metadata length arrays and the payload parts for a GET response.

    Blocks that sit in consecutive arena slots (a batch put together lands that way) go out as one span: one
    iovec instead of one per block. Built with list comprehensions and array operations: at 64 KiB blocks a
    batch is hundreds of blocks, and a per-block loop with appends shows in profiles."""
    records = [lease.record if lease is not None else None for lease in leases]
    hits = [r for r in records if r is not None]
    if any(r.meta for r in hits):
        return _describe_with_meta(records, arena)
    statuses = np.array([r is not None for r in records], np.uint8) * np.uint8(HIT)
    sizes = np.zeros(len(records), np.uint64)
    crcs = np.zeros(len(records), np.uint32)
    if len(hits) == len(records):
        sizes[:] = [r.size for r in hits]
        crcs[:] = [r.crc for r in hits]
    else:
        found = np.flatnonzero(statuses)
        sizes[found] = [r.size for r in hits]
        crcs[found] = [r.crc for r in hits]
    parts = []
    if hits:
        starts = np.array([r.slot for r in hits], np.int64) * arena.slot_bytes
        ends = starts + sizes[statuses == HIT].astype(np.int64)
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # a hit not right after the previous one
        firsts, lasts = [0, *breaks.tolist()], [*breaks.tolist(), len(hits)]
        parts = [arena.region(int(starts[a]), int(ends[b - 1] - starts[a]))
                 for a, b in zip(firsts, lasts, strict=True)]
    return statuses, sizes, crcs, np.zeros(len(records), np.uint32), parts


def _describe_with_meta(records: list, arena):
    """:func:`_describe` when some blocks carry metadata (each hit's metadata goes out before its bytes)."""
    statuses, sizes, crcs, meta_lens, parts = [], [], [], [], []
    slot_bytes = arena.slot_bytes
    run_start = run_end = -1
    for record in records:
        if record is None:
            statuses.append(0)
            sizes.append(0)
            crcs.append(0)
            meta_lens.append(0)
            continue
        statuses.append(HIT)
        sizes.append(record.size)
        crcs.append(record.crc)
        meta_lens.append(len(record.meta))
        start = record.slot * slot_bytes
        if record.meta or start != run_end:
            if run_end > run_start:
                parts.append(arena.region(run_start, run_end - run_start))
            run_start = run_end = start
            if record.meta:
                parts.append(record.meta)
        run_end += record.size
    if run_end > run_start:
        parts.append(arena.region(run_start, run_end - run_start))
    return (np.array(statuses, np.uint8), np.array(sizes, np.uint64), np.array(crcs, np.uint32),
            np.array(meta_lens, np.uint32), parts)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
