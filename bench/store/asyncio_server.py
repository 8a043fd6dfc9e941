"""An asyncio data server, for the benchmark only: the same store and protocol (GET and PUT) as
:class:`crescent.services.kvstore.data_server.DataServer`, on one event loop instead of a thread per client.

Zero-copy like the threaded server (``loop.sock_recv_into`` into reserved slots, ``loop.sock_sendall`` from
pinned slots); checksums run in the loop's executor so the loop keeps serving while they run. bench/store runs
both servers side by side; the service ships the faster one.
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np

from crescent.services.kvstore import wire as p
from crescent.services.kvstore.blocks import BlockKey, checksum
from crescent.services.kvstore.store import BlockStore, StoreFullError


async def _recv_exact(loop, sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


async def _recv_bytes(loop, sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    await _recv_exact(loop, sock, memoryview(buf))
    return buf


def _keys(req: p.BlockRequest) -> list[BlockKey]:
    return [BlockKey(req.model_id, int(h), req.layer_start, req.layer_end) for h in req.hashes]


async def _get(loop, sock, store: BlockStore, op, count: int, req: p.BlockRequest) -> None:
    leases = store.acquire_many(_keys(req), verify=False)
    try:
        check = loop.run_in_executor(None, lambda: [bool(lease and store.verify(lease)) for lease in leases])
        n = len(leases)
        statuses, sizes = np.zeros(n, np.uint8), np.zeros(n, np.uint64)
        crcs, meta_lens = np.zeros(n, np.uint32), np.zeros(n, np.uint32)
        parts: list = []
        for i, lease in enumerate(leases):
            if lease is not None:
                statuses[i], sizes[i], crcs[i] = p.BlockStatus.HIT, lease.record.size, lease.record.crc
                meta_lens[i] = len(lease.meta)
                parts += [lease.meta, lease.view]
        payload = int(sizes.sum() + meta_lens.sum())
        head = p.pack_header(op, count, count * 17, payload)
        await loop.sock_sendall(sock, b"".join([head, statuses.tobytes(), sizes.tobytes(), crcs.tobytes(),
                                                meta_lens.tobytes()]))
        for part in parts:
            if len(part):
                await loop.sock_sendall(sock, part)
        await loop.sock_sendall(sock, np.array(await check, np.uint8).tobytes())
    finally:
        for lease in leases:
            if lease is not None:
                store.release(lease)


async def _put(loop, sock, store: BlockStore, op, count: int, req: p.BlockRequest) -> None:
    statuses = np.zeros(count, np.uint8)
    scratch = memoryview(bytearray(1 << 20))
    for i, key in enumerate(_keys(req)):
        meta = bytes(await _recv_bytes(loop, sock, int(req.meta_lens[i])))
        size = int(req.sizes[i])
        try:
            res = store.reserve(key, size, meta)
        except StoreFullError:
            res = None
        if res is None:
            for start in range(0, size, len(scratch)):
                await _recv_exact(loop, sock, scratch[: min(len(scratch), size - start)])
            continue
        try:
            await _recv_exact(loop, sock, res.view)
        except BaseException:
            store.abort(res)
            raise
        store.commit(res, await loop.run_in_executor(None, checksum, res.view, meta))
        statuses[i] = p.BlockStatus.HIT
    await loop.sock_sendall(sock, p.pack_header(op, count, count, 0) + statuses.tobytes())


async def _serve_client(sock: socket.socket, store: BlockStore) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            head = await _recv_bytes(loop, sock, p.HEADER.size)
            op, _, count, body_len, _ = p.unpack_header(head)
            req = p.BlockRequest.decode(await _recv_bytes(loop, sock, body_len), count)
            if op == p.Op.GET:
                await _get(loop, sock, store, op, count, req)
            elif op == p.Op.PUT:
                await _put(loop, sock, store, op, count, req)
            else:
                p.send_error(sock, op, "the benchmark's asyncio server serves GET and PUT only")
                return
    except (ConnectionError, p.ProtocolError):
        pass
    finally:
        sock.close()


async def serve(store: BlockStore, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    while True:
        sock, _ = await loop.sock_accept(listener)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        loop.create_task(_serve_client(sock, store))
