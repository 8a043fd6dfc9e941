"""The ``mooncake`` transport: control over our framed protocol, block bytes through the Mooncake Transfer
Engine.

The server registers its DRAM arena with a TransferEngine (P2P handshake; protocol ``tcp``, or ``rdma`` on a node
with an RDMA NIC, from the store's settings, and clients follow the store's choice). A get asks the server to pin and checksum the blocks (MC_GET) and gets their arena
addresses back; the client reads them straight out of the arena with one ``batch_transfer_sync_read``, then
releases the lease (MC_RELEASE). A put reserves slots (MC_PUT), writes them with ``batch_transfer_sync_write``
and commits (MC_COMMIT), at which point the server checksums and publishes them. A client that disconnects in
between has its leases released and its reservations aborted by the data server. One engine transfer cannot be
interrupted, so ``abort()`` and the deadline take effect between the steps.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np

from crescent.services.kvstore import wire as p
from crescent.services.kvstore.blocks import checksum
from crescent.services.kvstore.dram import DramArena
from crescent.services.kvstore.store import BlockStore, StoreFullError
from crescent.services.kvstore.tcp import FramedConnection, lookup_over, run_transfer
from crescent.services.kvstore.transport import FetchedBlock, Transfer, TransferError, TransportClient

log = logging.getLogger(__name__)
LEASE = struct.Struct("<Q")
RDMA_DEVICES = Path("/sys/class/infiniband")


def rdma_devices(root: Path = RDMA_DEVICES) -> list[str]:
    """This node's RDMA NICs (what ibv_devices lists)."""
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def check_protocol(protocol: str, device: str, found: list[str]) -> None:
    """Refuse rdma on a node without the NICs it asks for, with the fix, before the engine fails less clearly."""
    if protocol != "rdma":
        return
    if not found:
        raise RuntimeError(f"mooncake_protocol=rdma, but this node has no RDMA NIC (nothing in {RDMA_DEVICES}); "
                           "use mooncake_protocol=tcp here")
    missing = [d for d in device.split(",") if d and d not in found]
    if missing:
        raise RuntimeError(f"mooncake_device {missing} not among this node's RDMA NICs {found}")


def new_engine(local_hostname: str, protocol: str = "tcp", device: str = ""):
    """A Transfer Engine on ``protocol`` ("tcp" or "rdma"); ``device``: RDMA NICs, empty = all of them."""
    check_protocol(protocol, device, rdma_devices())
    from mooncake.engine import TransferEngine  # optional dependency: crescent[mooncake]

    engine = TransferEngine()
    if engine.initialize(local_hostname, "P2PHANDSHAKE", protocol, device) != 0:
        raise RuntimeError(f"Mooncake TransferEngine failed to initialize on {local_hostname} over {protocol}")
    return engine


class MooncakeExport:
    """The server side: the arena registered with an engine, and the MC_* control ops."""

    def __init__(self, store: BlockStore, host: str, protocol: str = "tcp", device: str = ""):
        self.store = store
        self.protocol = protocol
        self.engine = new_engine(host, protocol, device)
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        store.add_arena_listener(self._register)

    def _register(self, arena: DramArena) -> None:
        if self.engine.register_memory(arena.base_address, arena.buffer.nbytes) != 0:
            raise RuntimeError("Mooncake could not register the DRAM arena")

    def handlers(self, server) -> dict:
        def info(session, op, count, body, payload_len):
            reply = json.dumps({"session": self.session, "block_bytes": self.store.block_bytes,
                                "protocol": self.protocol}).encode()
            p.send_all(session.sock, [p.pack_header(op, 0, len(reply), 0), reply])

        def get(session, op, count, body, payload_len):
            req = p.BlockRequest.decode(body, count)
            error = server.validate_blocks(req, sizes=False)
            if error:
                p.send_error(session.sock, op, error)
                return
            leases = server.acquire_all(req)
            lease_id = next(session.ids)
            session.leases[lease_id] = leases
            arrays, metas = _describe_pinned(leases, self.store)
            reply = LEASE.pack(lease_id) + arrays
            p.send_all(session.sock, [p.pack_header(op, count, len(reply), len(metas)), reply, metas])

        def put(session, op, count, body, payload_len):
            req = p.BlockRequest.decode(body, count)
            if int(req.meta_lens.sum()) != payload_len:
                raise p.ProtocolError("payload does not match the metadata lengths")
            error = server.validate_blocks(req)
            if error:
                p.drain(session.sock, payload_len, session.scratch)
                p.send_error(session.sock, op, error)
                return
            statuses, addrs = np.zeros(count, np.uint8), np.zeros(count, np.uint64)
            reservations = []
            for i in range(count):
                meta = bytes(p.recv_exact(session.sock, int(req.meta_lens[i])))
                res = None
                try:
                    res = self.store.reserve(server.key(req, i), int(req.sizes[i]), meta)
                    statuses[i] = p.BlockStatus.HIT if res else p.BlockStatus.EXISTS
                except StoreFullError:
                    statuses[i] = p.BlockStatus.FULL
                reservations.append(res)
                addrs[i] = self.store.arena.address(res.record.slot) if res else 0
            lease_id = next(session.ids)
            session.reservations[lease_id] = reservations
            reply = LEASE.pack(lease_id) + statuses.tobytes() + addrs.tobytes()
            p.send_all(session.sock, [p.pack_header(op, count, len(reply), 0), reply])

        def commit(session, op, count, body, payload_len):
            reservations = session.reservations.pop(_lease_id(body), None)
            if reservations is None:
                raise p.ProtocolError("unknown put lease")
            for res in reservations:
                if res is not None:
                    self.store.commit(res)
            p.send_all(session.sock, [p.pack_header(op, 0, 0, 0)])

        def release(session, op, count, body, payload_len):
            for lease in session.leases.pop(_lease_id(body), None) or []:
                if lease is not None:
                    self.store.release(lease)
            p.send_all(session.sock, [p.pack_header(op, 0, 0, 0)])

        return {p.Op.MC_INFO: info, p.Op.MC_GET: get, p.Op.MC_PUT: put, p.Op.MC_COMMIT: commit,
                p.Op.MC_RELEASE: release}


def _lease_id(body: bytearray) -> int:
    if len(body) != LEASE.size:
        raise p.ProtocolError("lease body must be 8 bytes")
    return LEASE.unpack(body)[0]


def _describe_pinned(leases, store: BlockStore) -> tuple[bytes, bytes]:
    n = len(leases)
    statuses, sizes = np.zeros(n, np.uint8), np.zeros(n, np.uint64)
    crcs, meta_lens, addrs = np.zeros(n, np.uint32), np.zeros(n, np.uint32), np.zeros(n, np.uint64)
    metas = []
    for i, lease in enumerate(leases):
        if lease is not None:
            rec = lease.record
            statuses[i], sizes[i], crcs[i], meta_lens[i] = p.BlockStatus.HIT, rec.size, rec.crc, len(rec.meta)
            addrs[i] = store.arena.address(rec.slot)
            metas.append(rec.meta)
    arrays = b"".join(a.tobytes() for a in (statuses, sizes, crcs, meta_lens, addrs))
    return arrays, b"".join(metas)


class MooncakeTransport(TransportClient):
    name = "mooncake"

    def __init__(self, host: str, port: int, timeout_s: float = 30.0, local_hostname: str = "127.0.0.1",
                 verify_checksums: bool = False, device: str = "", token: str = ""):
        """``device``: this node's RDMA NICs when the store uses rdma (empty = all of them); ``token``: the store's
        internal token (the control connection opens with it)."""
        super().__init__()
        self.conn = FramedConnection(host, port, timeout_s, token)
        self.verify_checksums = verify_checksums
        self._staging = np.empty(0, np.uint8)
        self._registered: dict[tuple[int, int], object] = {}  # (address, length) -> the buffer kept alive
        _, reply = self.conn.request(p.Op.MC_INFO, 0, b"", [], 0)
        info = json.loads(reply)
        self.session = info["session"]
        try:  # both ends of a transfer speak the store's protocol
            self.engine = new_engine(local_hostname, info.get("protocol", "tcp"), device)
        except BaseException:
            self.conn.drop()
            raise

    def _buffer(self, buf) -> int:
        """The address of ``buf`` (writable, contiguous), registering it with the engine once."""
        arr = np.frombuffer(buf, np.uint8)
        key = (int(arr.ctypes.data), arr.nbytes)
        if key not in self._registered:
            if len(self._registered) >= 8:  # keep registrations bounded: forget the oldest
                (addr, length), _ = next(iter(self._registered.items()))
                self.engine.unregister_memory(addr)
                del self._registered[(addr, length)]
            if self.engine.register_memory(*key) != 0:
                raise TransferError("Mooncake could not register a local buffer")
            self._registered[key] = buf
        return key[0]

    def _staging_for(self, nbytes: int) -> np.ndarray:
        if self._staging.nbytes < nbytes:
            self._staging = np.empty(1 << max(nbytes - 1, 1).bit_length(), np.uint8)
        self._buffer(self._staging)
        return self._staging

    def put(self, model_id, layer_range, hashes, blocks, metas) -> list[int]:
        n = len(hashes)
        sizes = np.array([len(b) for b in blocks], np.uint64)
        meta_lens = np.array([len(m) for m in metas], np.uint32)
        req = p.BlockRequest(model_id, *layer_range, np.array(hashes, np.uint64), sizes, meta_lens)

        def body(t: Transfer) -> list[int]:
            _, reply = self.conn.request(p.Op.MC_PUT, n, req.encode(), list(metas), int(meta_lens.sum()))
            lease, statuses = reply[:8], np.frombuffer(reply, np.uint8, n, 8)
            addrs = np.frombuffer(reply, np.uint64, n, 8 + n)
            todo = [i for i in range(n) if statuses[i] == p.BlockStatus.HIT]
            if todo:
                staging = self._staging_for(int(sizes.sum()))
                local, at = [], 0
                for i in todo:
                    staging[at : at + len(blocks[i])] = np.frombuffer(blocks[i], np.uint8)
                    local.append(int(staging.ctypes.data) + at)
                    at += len(blocks[i])
                t.check()
                rc = self.engine.batch_transfer_sync_write(self.session, local, [int(addrs[i]) for i in todo],
                                                           [int(sizes[i]) for i in todo])
                if rc != 0:
                    raise TransferError(f"Mooncake batch write failed (rc={rc})")
            self.conn.request(p.Op.MC_COMMIT, 0, bytes(lease), [], 0)
            return list(statuses)

        return run_transfer(self, self.conn, "put", body)

    def get(self, model_id, layer_range, hashes, out=None) -> list[FetchedBlock | None]:
        n = len(hashes)
        req = p.BlockRequest(model_id, *layer_range, np.array(hashes, np.uint64))

        def body(t: Transfer) -> list[FetchedBlock | None]:
            meta_len, reply = self.conn.request(p.Op.MC_GET, n, req.encode(), [], 0)
            metas = p.recv_exact(self.conn.get(), meta_len)
            try:
                return self._read(t, reply, n, metas, out)
            finally:
                self.conn.request(p.Op.MC_RELEASE, 0, bytes(reply[:8]), [], 0)

        return run_transfer(self, self.conn, "get", body)

    def _read(
        self, t: Transfer, reply: bytearray, n: int, metas: bytearray, out
    ) -> list[FetchedBlock | None]:
        arrays = memoryview(reply)[8:]
        statuses = np.frombuffer(arrays, np.uint8, n, 0)
        sizes = np.frombuffer(arrays, np.uint64, n, n)
        addrs = np.frombuffer(arrays, np.uint64, n, 17 * n)
        total = int(sizes.sum())
        if out is not None and len(out) < total:
            raise TransferError(f"out buffer of {len(out)} bytes is smaller than the {total}-byte reply")
        dest = out if out is not None else bytearray(total)
        hits = [i for i in range(n) if statuses[i] == p.BlockStatus.HIT]
        if not hits:
            return [None] * n
        base = self._buffer(dest) if out is not None else int(self._staging_for(total).ctypes.data)
        local, at = [], 0
        for i in hits:
            local.append(base + at)
            at += int(sizes[i])
        t.check()
        rc = self.engine.batch_transfer_sync_read(
            self.session, local, [int(addrs[i]) for i in hits], [int(sizes[i]) for i in hits]
        )
        if rc != 0:
            raise TransferError(f"Mooncake batch read failed (rc={rc})")
        if out is None:
            memoryview(dest)[:total] = memoryview(self._staging)[:total]
        # the same layout split_payload expects: each hit's metadata, then its bytes
        return _assemble(arrays[: 17 * n], n, memoryview(dest), metas, self.verify_checksums)

    def lookup(self, model_id, layer_range, hashes) -> tuple[int, list[int]]:
        return lookup_over(self, self.conn, model_id, layer_range, hashes)

    def close(self) -> None:
        self.conn.drop()
        for addr, _ in list(self._registered):
            self.engine.unregister_memory(addr)
        self._registered.clear()


def _assemble(arrays: memoryview, n: int, data: memoryview, metas: bytearray, verify: bool):
    """Per-block views of ``data`` (the hits back to back) with their metadata; bad checksums become
    misses."""
    statuses = np.frombuffer(arrays, np.uint8, n, 0)
    sizes = np.frombuffer(arrays, np.uint64, n, n)
    crcs = np.frombuffer(arrays, np.uint32, n, 9 * n)
    meta_lens = np.frombuffer(arrays, np.uint32, n, 13 * n)
    out: list[FetchedBlock | None] = []
    at = meta_at = 0
    for i in range(n):
        if statuses[i] != p.BlockStatus.HIT:
            out.append(None)
            continue
        meta = bytes(metas[meta_at : meta_at + int(meta_lens[i])])
        meta_at += int(meta_lens[i])
        block = data[at : at + int(sizes[i])]
        at += int(sizes[i])
        out.append(FetchedBlock(block, meta) if not verify or checksum(block, meta) == int(crcs[i]) else None)
    return out
