"""The SSD tier: one file per block under a data directory, written atomically, found again after a restart.

File layout: a fixed header (magic, version, sizes, crc), the model id, the metadata, zero padding, then the
block at a 4 KiB-aligned offset, so a block is read with O_DIRECT straight into its (page-aligned) DRAM slot:
one disk read per block, no page-cache copy, no cache pollution (buffered reads are the fallback). That read
is only as fast as a plain sequential read when the slot sits in huge pages (DramArena advises them): the disk
takes a bounded number of memory segments per request, so 4 KiB pages cut a block into ~1 MiB requests. A file is
written to ``<name>.tmp``, fsynced and renamed, so a crash leaves either the whole block or a ``.tmp`` that
the next start deletes; a torn or bit-flipped file fails its checksum on read and is served as a miss.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
from pathlib import Path

from crescent.services.kvstore.blocks import BlockKey, BlockRecord, Tier

log = logging.getLogger(__name__)

MAGIC = b"CKVB"
VERSION = 2
ALIGN = 4096  # O_DIRECT needs file offset, length and memory address aligned to the device block
# magic, version, block_hash, layer_start, layer_end, size, crc, meta_len, model_id_len
HEADER = struct.Struct("<4sHQIIQIIH")
SUFFIX = ".blk"


def data_offset(model_len: int, meta_len: int) -> int:
    return -(-(HEADER.size + model_len + meta_len) // ALIGN) * ALIGN


def file_name(key: BlockKey) -> str:
    """A fixed-length name from the whole key (model ids may hold '/' or be long)."""
    raw = f"{key.model_id}\0{key.block_hash}\0{key.layer_start}\0{key.layer_end}".encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest() + SUFFIX


class SsdTier:
    def __init__(self, data_dir: str | Path, capacity_bytes: int, fsync: bool = True):
        self.root = Path(data_dir)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.direct = hasattr(os, "O_DIRECT")  # switched off if this filesystem refuses it (e.g. tmpfs)
        if capacity_bytes > 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: BlockKey) -> Path:
        name = file_name(key)
        return self.root / name[:2] / name  # 256 subdirectories keep directories small

    def write(self, record: BlockRecord, data) -> None:
        """Write one block atomically; raises OSError (e.g. ENOSPC) after removing any partial temp file."""
        key = record.key
        model = key.model_id.encode()
        header = HEADER.pack(MAGIC, VERSION, key.block_hash, key.layer_start, key.layer_end, record.size,
                             record.crc, len(record.meta), len(model))
        final = self.path(key)
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                pad = bytes(
                    data_offset(len(model), len(record.meta)) - HEADER.size - len(model) - len(record.meta)
                )
                _write_all(fd, [header, model, record.meta, pad, data])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def read_into(self, record: BlockRecord, out: memoryview, address: int = 1) -> bool:
        """Read the block's bytes into ``out`` (its exact size, at memory ``address``); False if the file is
        gone or short. The checksum, checked by the caller, catches anything else."""
        offset = data_offset(len(record.key.model_id.encode()), len(record.meta))
        direct = self.direct and address % ALIGN == 0 and len(out) % ALIGN == 0
        try:
            try:
                fd = os.open(self.path(record.key), os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                self.direct, direct = False, False
                log.info("O_DIRECT unsupported under %s; using buffered reads", self.root)
                fd = os.open(self.path(record.key), os.O_RDONLY)
            try:
                got = 0
                while got < len(out):
                    n = os.preadv(fd, [out[got:]], offset + got)
                    if n <= 0:
                        return False
                    got += n
                return True
            finally:
                os.close(fd)
        except OSError:
            return False

    def set_recency(self, key: BlockKey, mtime_ns: int) -> None:
        """Stamp a block file's modification time: :meth:`scan` orders blocks by it (LRU after a
        restart)."""
        os.utime(self.path(key), ns=(mtime_ns, mtime_ns))

    def delete(self, key: BlockKey) -> None:
        try:
            self.path(key).unlink()
        except OSError as exc:
            log.warning("could not delete SSD block %s: %s", key, exc)

    def scan(self) -> list[BlockRecord]:
        """Records of every whole block file, oldest first (the restart's LRU order); temp files are
        deleted."""
        if self.capacity_bytes <= 0 or not self.root.exists():
            return []
        found: list[tuple[int, BlockRecord]] = []
        for path in self.root.glob("*/*"):
            if path.suffix == ".tmp":
                path.unlink(missing_ok=True)
                continue
            record = _read_header(path)
            if record is None or self.path(record.key) != path:
                log.warning("ignoring unreadable block file %s", path)
                continue
            found.append((path.stat().st_mtime_ns, record))
        found.sort(key=lambda item: item[0])
        return [record for _, record in found]


def _write_all(fd: int, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _read_header(path: Path) -> BlockRecord | None:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) != HEADER.size:
                return None
            magic, version, block_hash, start, end, size, crc, meta_len, model_len = HEADER.unpack(head)
            if magic != MAGIC or version != VERSION:
                return None
            model_id = f.read(model_len).decode()
            meta = f.read(meta_len)
            if path.stat().st_size != data_offset(model_len, meta_len) + size or len(meta) != meta_len:
                return None
    except (OSError, UnicodeDecodeError):
        return None
    key = BlockKey(model_id, block_hash, start, end)
    return BlockRecord(key=key, size=size, crc=crc, meta=meta, tier=Tier.SSD)
