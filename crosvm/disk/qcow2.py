"""qcow2 images, versions 2 and 3, written from QEMU's published format description.

Guest offsets map through a two-level table (L1 in memory, L2 tables in a bounded
cache) to host clusters whose use counts live in refcount blocks (also cached, under
an in-memory refcount table). Metadata reaches the file only in `sync()`, in an order
that keeps the image consistent whatever point the process dies at:

    guest data -> refcount blocks -> refcount table -> header -> L2 tables -> L1 table

with an fdatasync between stages, so nothing on disk ever points at a cluster whose
refcount or contents are not yet durable. Clusters a write or discard stops using are
released only after the sync that removed the last reference (a crash in between
leaks them, which `qemu-img check -r leaks` repairs, but never corrupts).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import zlib
from array import array
from collections import OrderedDict

from crosvm.disk.disk_file import DiskError, DiskFile
from crosvm.disk.raw import open_locked, pread_full, pwrite_full

MAGIC = b"QFI\xfb"
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3 = struct.Struct(">QQQII")           # 32 more bytes
V3_HEADER_LENGTH = HEADER_V2.size + HEADER_V3.size  # 104

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20        # QEMU's own limits, so every image it makes opens here
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
MAX_SIZE = 1 << 62
L2_CACHE_BYTES = 32 << 20
REFBLOCK_CACHE_BYTES = 8 << 20
MIN_CACHE_TABLES = 16

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_RESERVED = 0x3F00_0000_0000_01FE
REFTABLE_RESERVED = 0x1FF

# Incompatible feature bits.
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
INCOMPAT_NAMES = {INCOMPAT_DIRTY: "dirty", INCOMPAT_CORRUPT: "corrupt",
                  INCOMPAT_DATA_FILE: "external data file",
                  INCOMPAT_COMPRESSION: "compression type",
                  INCOMPAT_EXTL2: "extended L2 entries"}

EXT_END, EXT_BACKING_FORMAT = 0, 0xE2792ACA
COMPRESSION_DEFLATE, COMPRESSION_ZSTD = 0, 1

_NATIVE_LITTLE = sys.byteorder == "little"


def _be_array(data: bytes) -> array:
    a = array("Q", data)
    if _NATIVE_LITTLE:
        a.byteswap()
    return a


def _be_bytes(a: array) -> bytes:
    if not _NATIVE_LITTLE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


class _Zstd:
    """libzstd through ctypes (qemu-utils depends on it; Python 3.11 has no zstd)."""

    lib = None

    @classmethod
    def load(cls) -> None:
        """Load libzstd now: a jailed device cannot find or open libraries later."""
        if cls.lib is None:
            from ctypes.util import find_library  # spawns ldconfig: only when zstd is needed
            name = find_library("zstd")
            if name is None:
                raise DiskError("zstd-compressed qcow2 clusters need libzstd")
            lib = ctypes.CDLL(name)
            lib.ZSTD_findFrameCompressedSize.restype = ctypes.c_size_t
            lib.ZSTD_findFrameCompressedSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
            lib.ZSTD_decompress.restype = ctypes.c_size_t
            lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_char_p, ctypes.c_size_t]
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            cls.lib = lib

    @classmethod
    def decompress(cls, data: bytes, size: int) -> bytes:
        cls.load()
        lib = cls.lib
        frame = lib.ZSTD_findFrameCompressedSize(data, len(data))
        if lib.ZSTD_isError(frame):
            raise DiskError("a zstd-compressed cluster is corrupt")
        out = ctypes.create_string_buffer(size)
        n = lib.ZSTD_decompress(out, size, data, frame)
        if lib.ZSTD_isError(n) or n != size:
            raise DiskError("a zstd-compressed cluster is corrupt")
        return out.raw


class Qcow2Disk(DiskFile):
    """An opened qcow2 image (see the module docstring for the write ordering)."""

    def __init__(self, path: str, read_only: bool = False, sparse: bool = True,
                 backing_depth: int = 0, seen: frozenset = frozenset(),
                 fd: int | None = None) -> None:
        self.path = path
        self.read_only = read_only
        self.sparse = sparse
        self.fd = open_locked(path, read_only) if fd is None else fd
        self.backing: DiskFile | None = None
        try:
            self._open(backing_depth, seen)
        except BaseException:
            self.close_files()
            raise

    # -- opening -----------------------------------------------------------------
    def _err(self, why: str) -> DiskError:
        return DiskError(f"qcow2 image {self.path}: {why}")

    def _open(self, depth: int, seen: frozenset) -> None:
        file_size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, V3_HEADER_LENGTH + 1, 0)
        if len(head) < HEADER_V2.size or head[:4] != MAGIC:
            raise self._err("not a qcow2 header")
        (_, version, backing_offset, backing_size, cluster_bits, size, crypt,
         l1_size, l1_offset, rt_offset, rt_clusters, nb_snapshots,
         _snap_offset) = HEADER_V2.unpack_from(head)
        if version not in (2, 3):
            raise self._err(f"version {version} is not supported (only 2 and 3)")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self._err(f"cluster_bits {cluster_bits} is outside "
                            f"{MIN_CLUSTER_BITS}-{MAX_CLUSTER_BITS}")
        cs = 1 << cluster_bits
        incompat = compat = autoclear = 0
        refcount_order, header_length, compression = 4, HEADER_V2.size, COMPRESSION_DEFLATE
        if version == 3:
            if len(head) < V3_HEADER_LENGTH:
                raise self._err("truncated version 3 header")
            incompat, compat, autoclear, refcount_order, header_length = \
                HEADER_V3.unpack_from(head, HEADER_V2.size)
            if header_length < V3_HEADER_LENGTH or header_length % 8 or header_length > cs:
                raise self._err(f"header_length {header_length} is invalid")
            if header_length > V3_HEADER_LENGTH and len(head) > V3_HEADER_LENGTH:
                compression = head[V3_HEADER_LENGTH]
        if crypt:
            raise self._err("encrypted images are not supported")
        if refcount_order > 6:
            raise self._err(f"refcount_order {refcount_order} is larger than 6")
        for bit in (INCOMPAT_DIRTY, INCOMPAT_CORRUPT):
            if incompat & bit:
                raise self._err(f"the image is marked {INCOMPAT_NAMES[bit]}; "
                                "repair it with `qemu-img check -r all`")
        unsupported = incompat & ~INCOMPAT_COMPRESSION
        if unsupported:
            names = [INCOMPAT_NAMES.get(1 << b, f"bit {b}") for b in range(64)
                     if unsupported >> b & 1]
            raise self._err("unsupported incompatible features: " + ", ".join(names))
        if bool(incompat & INCOMPAT_COMPRESSION) != (compression != COMPRESSION_DEFLATE):
            raise self._err("compression type and its feature bit disagree")
        if compression not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
            raise self._err(f"unknown compression type {compression}")
        if size > MAX_SIZE:
            raise self._err(f"virtual size {size} is too large")
        self.version = version
        self.cluster_bits = cluster_bits
        self.cluster_size = cs
        self.l2_bits = cluster_bits - 3
        self.l2_entries = cs // 8
        self.size = size
        self.compression = compression
        self.refcount_bits = 1 << refcount_order
        self.rb_entries_bits = cluster_bits + 3 - refcount_order
        self.nb_snapshots = nb_snapshots
        if nb_snapshots and not self.read_only:
            raise self._err("images with internal snapshots can only be opened read-only")
        self.file_end = (file_size + cs - 1) & ~(cs - 1)
        if compression == COMPRESSION_ZSTD:
            _Zstd.load()

        # L1 table.
        needed = -(-size // (cs * self.l2_entries))
        if l1_size < needed:
            raise self._err(f"L1 table of {l1_size} entries is too small for {size} bytes")
        if l1_size * 8 > MAX_L1_BYTES:
            raise self._err(f"L1 table of {l1_size} entries is too large")
        self._check_table(l1_offset, l1_size * 8, "L1 table", file_size)
        self.l1_offset = l1_offset
        self.l1 = _be_array(self._pread(l1_offset, l1_size * 8, "L1 table"))

        # Refcount table.
        if rt_clusters == 0 or rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise self._err(f"refcount table of {rt_clusters} clusters is invalid")
        self._check_table(rt_offset, rt_clusters * cs, "refcount table", file_size)
        self.rt_offset = rt_offset
        self.rt_clusters = rt_clusters
        self.reftable = _be_array(self._pread(rt_offset, rt_clusters * cs, "refcount table"))
        self._refblock_set = set()
        for e in self.reftable:
            if e & REFTABLE_RESERVED:
                raise self._err(f"refcount table entry {e:#x} is not cluster aligned")
            if e:
                self._check_cluster(e, "refcount block")
                self._refblock_set.add(e)
        self._l2_set = set()
        if not self.read_only:
            self._l2_set = {e & OFFSET_MASK for e in self.l1 if e & OFFSET_MASK}
        # Ranges guest data must never be written over.
        self._fixed_meta = [(0, cs), (l1_offset, l1_size * 8), (rt_offset, rt_clusters * cs)]

        # Header extensions, then the backing file.
        ext_end = backing_offset if backing_offset else cs
        backing_format = self._read_extensions(header_length, min(ext_end, cs), file_size)
        if backing_offset:
            if backing_size > MAX_BACKING_NAME or backing_size == 0:
                raise self._err(f"backing file name of {backing_size} bytes is invalid")
            if backing_offset + backing_size > cs:
                raise self._err("backing file name is outside the first cluster")
            name = self._pread(backing_offset, backing_size, "backing file name")
            self._open_backing(name, backing_format, depth, seen)

        self.l2_cache: OrderedDict[int, array] = OrderedDict()
        self.l2_dirty: set[int] = set()
        self.l2_cache_max = max(MIN_CACHE_TABLES, L2_CACHE_BYTES // cs)
        self.rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.rb_dirty: set[int] = set()
        self.rb_cache_max = max(MIN_CACHE_TABLES, REFBLOCK_CACHE_BYTES // cs)
        self.l1_dirty: set[int] = set()
        self.rt_dirty: set[int] = set()
        self.header_dirty = False
        self.pending_free: list[tuple[int, int]] = []   # (host offset, bytes)
        self.free_clusters: list[int] = []
        self.data_dirty = False
        self._compressed_cache: tuple[int, bytes] | None = None
        if not self.read_only and autoclear:
            # Features we do not maintain (bitmaps...) must be declared stale.
            pwrite_full(self.fd, bytes(8), 88)
            os.fdatasync(self.fd)

    def _pread(self, offset: int, length: int, what: str) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise self._err(f"{what} at {offset:#x} is outside the file")
        return data

    def _check_table(self, offset: int, length: int, what: str, file_size: int) -> None:
        if offset & (self.cluster_size - 1):
            raise self._err(f"{what} offset {offset:#x} is not cluster aligned")
        if length and (offset == 0 or offset + length > file_size):
            raise self._err(f"{what} at {offset:#x} is outside the file or on the header")

    def _check_cluster(self, offset: int, what: str) -> None:
        if offset & (self.cluster_size - 1):
            raise self._err(f"{what} offset {offset:#x} is not cluster aligned")
        if offset == 0:
            raise self._err(f"{what} points at the header")

    def _read_extensions(self, start: int, end: int, file_size: int) -> str | None:
        fmt = None
        data = os.pread(self.fd, max(0, end - start), start)
        pos = 0
        while pos + 8 <= len(data):
            ext_type, length = struct.unpack_from(">II", data, pos)
            if ext_type == EXT_END:
                break
            body = data[pos + 8:pos + 8 + length]
            if len(body) != length:
                raise self._err(f"header extension {ext_type:#x} runs past the header")
            if ext_type == EXT_BACKING_FORMAT:
                fmt = body.decode("ascii", "replace")
            pos += 8 + ((length + 7) & ~7)
        return fmt

    def _open_backing(self, name: bytes, fmt: str | None, depth: int, seen: frozenset) -> None:
        from crosvm.disk import MAX_BACKING_DEPTH, open_disk  # the formats nest
        try:
            rel = name.decode()
        except UnicodeDecodeError:
            raise self._err("backing file name is not UTF-8") from None
        if "\0" in rel:
            raise self._err("backing file name contains NUL")
        if depth + 1 > MAX_BACKING_DEPTH:
            raise self._err(f"backing chain is deeper than {MAX_BACKING_DEPTH}")
        path = rel if os.path.isabs(rel) else os.path.join(os.path.dirname(self.path) or ".",
                                                          rel)
        if fmt not in (None, "raw", "qcow2"):
            raise self._err(f"backing file format '{fmt}' is not supported")
        self.backing = open_disk(path, read_only=True, backing_depth=depth + 1, seen=seen,
                                 format=fmt)

    # -- tables -------------------------------------------------------------------
    def _l2_table(self, offset: int) -> array:
        table = self.l2_cache.get(offset)
        if table is not None:
            self.l2_cache.move_to_end(offset)
            return table
        self._check_cluster(offset, "L2 table")
        self._make_room(self.l2_cache, self.l2_dirty, self.l2_cache_max)
        table = _be_array(self._pread(offset, self.cluster_size, "L2 table"))
        self.l2_cache[offset] = table
        return table

    def _make_room(self, cache: OrderedDict, dirty: set, limit: int) -> None:
        if len(cache) < limit:
            return
        if dirty:
            self._write_back()  # an evicted table must reach the file in the safe order
        while len(cache) >= limit:
            cache.popitem(last=False)

    def _refblock(self, offset: int) -> bytearray:
        block = self.rb_cache.get(offset)
        if block is not None:
            self.rb_cache.move_to_end(offset)
            return block
        self._make_room(self.rb_cache, self.rb_dirty, self.rb_cache_max)
        block = bytearray(self._pread(offset, self.cluster_size, "refcount block"))
        self.rb_cache[offset] = block
        return block

    def _rc_get(self, block: bytearray, i: int) -> int:
        bits = self.refcount_bits
        if bits >= 8:
            n = bits >> 3
            return int.from_bytes(block[i * n:(i + 1) * n], "big")
        per = 8 // bits
        return block[i // per] >> (i % per * bits) & ((1 << bits) - 1)

    def _rc_set(self, block: bytearray, i: int, value: int) -> None:
        bits = self.refcount_bits
        if bits >= 8:
            n = bits >> 3
            block[i * n:(i + 1) * n] = value.to_bytes(n, "big")
            return
        per = 8 // bits
        shift = i % per * bits
        mask = ((1 << bits) - 1) << shift
        block[i // per] = block[i // per] & ~mask | value << shift

    def refcount(self, host: int) -> int:
        """The refcount of the cluster at `host` (0 when no refcount block covers it)."""
        index = host >> self.cluster_bits
        rt_index = index >> self.rb_entries_bits
        if rt_index >= len(self.reftable) or not self.reftable[rt_index]:
            return 0
        block = self._refblock(self.reftable[rt_index])
        return self._rc_get(block, index & ((1 << self.rb_entries_bits) - 1))

    def _set_refcount(self, host: int, value: int) -> None:
        if value >= 1 << self.refcount_bits:
            raise self._err(f"refcount overflow on cluster {host:#x}")
        index = host >> self.cluster_bits
        rt_index = index >> self.rb_entries_bits
        if rt_index >= len(self.reftable):
            self._grow_reftable(rt_index)
        rb_offset = self.reftable[rt_index]
        if not rb_offset:
            # A new refcount block at the end of the file; it counts itself (or is
            # counted by another new block, which this recursion creates).
            rb_offset = self.file_end
            self.file_end += self.cluster_size
            self._make_room(self.rb_cache, self.rb_dirty, self.rb_cache_max)
            self.rb_cache[rb_offset] = bytearray(self.cluster_size)
            self.rb_dirty.add(rb_offset)
            self.reftable[rt_index] = rb_offset
            self.rt_dirty.add(rt_index)
            self._refblock_set.add(rb_offset)
            own = rb_offset >> self.cluster_bits
            if own >> self.rb_entries_bits == rt_index:   # the usual case: it counts itself
                self._rc_set(self.rb_cache[rb_offset], own & ((1 << self.rb_entries_bits) - 1), 1)
            else:
                self._set_refcount(rb_offset, 1)
        block = self._refblock(rb_offset)
        self._rc_set(block, index & ((1 << self.rb_entries_bits) - 1), value)
        self.rb_dirty.add(rb_offset)

    def _grow_reftable(self, rt_index: int) -> None:
        cs = self.cluster_size
        old_offset, old_clusters = self.rt_offset, self.rt_clusters
        entries = max(rt_index + 1, len(self.reftable) * 2)
        clusters = -(-(entries * 8) // cs) + 1   # room for the blocks counting the table
        if clusters * cs > MAX_REFTABLE_BYTES:
            raise self._err("the refcount table would exceed its maximum size")
        table = array("Q", self.reftable)
        table.extend([0] * (clusters * cs // 8 - len(table)))
        self.reftable = table
        self.rt_offset = self.file_end
        self.rt_clusters = clusters
        self.file_end += clusters * cs
        self.rt_dirty = set(range(len(table)))
        self.header_dirty = True
        self._fixed_meta[2] = (self.rt_offset, clusters * cs)
        for i in range(clusters):
            self._set_refcount(self.rt_offset + i * cs, 1)
        self.pending_free.append((old_offset, old_clusters * cs))

    def _allocate(self) -> int:
        """A cluster with refcount 1 (its refcount change is written at the next sync)."""
        while self.free_clusters:
            host = self.free_clusters.pop()
            if self.refcount(host) == 0:
                break
        else:
            host = self.file_end
            self.file_end += self.cluster_size
        self._set_refcount(host, 1)
        return host

    def _release(self, host: int, length: int) -> None:
        """Drop one reference to the clusters of [host, host+length) after the next sync."""
        self.pending_free.append((host, length))

    # -- mapping -------------------------------------------------------------------
    def _entry(self, pos: int, create: bool) -> tuple[array | None, int]:
        """(L2 table, index) for guest offset `pos`; None when the L2 table is absent."""
        l1_index = pos >> (self.cluster_bits + self.l2_bits)
        l1e = self.l1[l1_index]
        if l1e & L1_RESERVED:
            raise self._err(f"L1 entry {l1_index} has reserved bits set ({l1e:#x})")
        index = (pos >> self.cluster_bits) & (self.l2_entries - 1)
        l2_offset = l1e & OFFSET_MASK
        if l2_offset == 0:
            if not create:
                return None, index
            l2_offset = self._allocate()
            self._make_room(self.l2_cache, self.l2_dirty, self.l2_cache_max)
            self.l2_cache[l2_offset] = array("Q", bytes(self.cluster_size))
            self.l2_dirty.add(l2_offset)
            self._l2_set.add(l2_offset)
            self.l1[l1_index] = l2_offset | COPIED
            self.l1_dirty.add(l1_index)
        elif create and not l1e & COPIED:
            raise self._err("a shared L2 table (from an internal snapshot) cannot be written")
        return self._l2_table(l2_offset), index

    def _check_entry(self, entry: int) -> None:
        if entry & COMPRESSED:
            if entry & COPIED:
                raise self._err(f"compressed L2 entry {entry:#x} has the copied bit")
            return
        if entry & L2_RESERVED or entry & OFFSET_MASK & (self.cluster_size - 1):
            raise self._err(f"L2 entry {entry:#x} is invalid")
        if entry & ZERO and self.version < 3:
            raise self._err(f"L2 entry {entry:#x} has the zero bit in a version 2 image")
        if entry & OFFSET_MASK == 0 and entry & COPIED and not entry & ZERO:
            raise self._err(f"L2 entry {entry:#x} points at the header")

    def _compressed_span(self, entry: int) -> tuple[int, int]:
        shift = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << shift) - 1)
        sectors = ((entry & ~COMPRESSED) >> shift) + 1
        return host, sectors * 512 - (host & 511)

    def _read_compressed(self, entry: int) -> bytes:
        host, length = self._compressed_span(entry)
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        if host < self.cluster_size:
            raise self._err(f"compressed cluster at {host:#x} overlaps the header")
        data = os.pread(self.fd, length, host)
        if not data:
            raise self._err(f"compressed cluster at {host:#x} is outside the file")
        cs = self.cluster_size
        if self.compression == COMPRESSION_ZSTD:
            out = _Zstd.decompress(data, cs)
        else:
            try:
                out = zlib.decompressobj(-15).decompress(data, cs)
            except zlib.error as e:
                raise self._err(f"compressed cluster at {host:#x} is corrupt: {e}") from None
            if len(out) != cs:
                raise self._err(f"compressed cluster at {host:#x} is corrupt")
        self._compressed_cache = (entry, out)
        return out

    # -- I/O -------------------------------------------------------------------------
    def fds(self) -> list[int]:
        return [self.fd] + (self.backing.fds() if self.backing is not None else [])

    def _read_backing(self, pos: int, buf: memoryview) -> None:
        backing = self.backing
        if backing is None:
            buf[:] = bytes(len(buf))
            return
        inside = max(0, min(len(buf), backing.size - pos))
        if inside:
            backing.read_at(pos, buf[:inside])
        if inside < len(buf):
            buf[inside:] = bytes(len(buf) - inside)

    def read_at(self, offset: int, buf: memoryview) -> None:
        self.check_range(offset, len(buf))
        cs = self.cluster_size
        done, total = 0, len(buf)
        while done < total:
            pos = offset + done
            within = pos & (cs - 1)
            n = min(cs - within, total - done)
            table, index = self._entry(pos, False)
            entry = table[index] if table is not None else 0
            self._check_entry(entry)
            part = buf[done:done + n]
            if entry & COMPRESSED:
                part[:] = self._read_compressed(entry)[within:within + n]
            elif entry & ZERO:
                part[:] = bytes(n)
            elif entry & OFFSET_MASK == 0:
                self._read_backing(pos, part)
            else:
                host = entry & OFFSET_MASK
                # Extend over following clusters that are contiguous in the file too.
                while done + n < total and index + 1 < self.l2_entries:
                    nxt = table[index + 1]
                    if nxt & (COMPRESSED | ZERO) or nxt & OFFSET_MASK != host + (n + within):
                        break
                    self._check_entry(nxt)
                    index += 1
                    n = min(n + cs, total - done)
                    part = buf[done:done + n]
                if pread_full(self.fd, part, host + within) != n:
                    raise self._err(f"data cluster at {host:#x} is outside the file")
            done += n

    def _check_overlap(self, host: int) -> None:
        for start, length in self._fixed_meta:
            if start <= host < start + length:
                raise self._err(f"data cluster {host:#x} overlaps metadata")
        if host in self._l2_set or host in self._refblock_set:
            raise self._err(f"data cluster {host:#x} overlaps metadata")

    def write_at(self, offset: int, buf: memoryview) -> None:
        if self.read_only:
            raise self._err("the disk is read-only")
        self.check_range(offset, len(buf))
        cs = self.cluster_size
        done, total = 0, len(buf)
        while done < total:
            pos = offset + done
            within = pos & (cs - 1)
            n = min(cs - within, total - done)
            table, index = self._entry(pos, True)
            entry = table[index]
            self._check_entry(entry)
            host = entry & OFFSET_MASK
            if not entry & (COMPRESSED | ZERO) and host and entry & COPIED:
                self._check_overlap(host)
                pwrite_full(self.fd, buf[done:done + n], host + within)
            else:
                self._write_new_cluster(pos - within, table, index, entry,
                                        within, buf[done:done + n])
            self.data_dirty = True
            done += n

    def _write_new_cluster(self, cluster_pos: int, table: array, index: int, entry: int,
                           within: int, data: memoryview) -> None:
        """Copy-on-write: the cluster's current contents with `data` over them, in a
        newly allocated cluster (or in place for a preallocated zero cluster)."""
        cs = self.cluster_size
        if len(data) == cs:
            content = data
        else:
            whole = bytearray(cs)
            if entry & COMPRESSED:
                whole[:] = self._read_compressed(entry)
            elif entry & ZERO:
                pass
            elif entry & OFFSET_MASK:
                old = memoryview(whole)
                if pread_full(self.fd, old, entry & OFFSET_MASK) != cs:
                    raise self._err("data cluster is outside the file")
            else:
                self._read_backing(cluster_pos, memoryview(whole))
            whole[within:within + len(data)] = data
            content = memoryview(whole)
        old_host = entry & OFFSET_MASK if not entry & COMPRESSED else 0
        if entry & ZERO and old_host and entry & COPIED:
            host = old_host   # preallocated zero cluster: ours alone, fill it in place
            self._check_overlap(host)
        else:
            host = self._allocate()
            if entry & COMPRESSED:
                self._release(*self._compressed_span(entry))
            elif old_host:
                self._release(old_host, cs)
        pwrite_full(self.fd, content, host)
        table[index] = host | COPIED
        self.l2_dirty.add(self._table_offset(cluster_pos))

    def _table_offset(self, pos: int) -> int:
        return self.l1[pos >> (self.cluster_bits + self.l2_bits)] & OFFSET_MASK

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.read_only:
            raise self._err("the disk is read-only")
        self.check_range(offset, length)
        cs = self.cluster_size
        end = offset + length
        pos = offset
        while pos < end:
            within = pos & (cs - 1)
            n = min(cs - within, end - pos)
            if n < cs or (self.version < 3 and self.backing is not None):
                self._write_zero_bytes(pos, n)
            else:
                self._zero_cluster(pos)
            pos += n

    punch_hole = write_zeroes

    def _write_zero_bytes(self, pos: int, n: int) -> None:
        table, index = self._entry(pos, False)
        entry = table[index] if table is not None else 0
        if entry & ZERO or (entry == 0 and self.backing is None):
            return  # already reads as zeroes
        self.write_at(pos, memoryview(bytes(n)))

    def _zero_cluster(self, pos: int) -> None:
        table, index = self._entry(pos, False)
        entry = table[index] if table is not None else 0
        self._check_entry(entry)
        # Without a backing file an unallocated cluster reads as zeroes; with one, only
        # the zero flag does (version 2 images with a backing file write zero bytes).
        target = ZERO if self.backing is not None else 0
        if entry == target:
            return
        if table is None:
            table, index = self._entry(pos, True)
        if entry & COMPRESSED:
            self._release(*self._compressed_span(entry))
        elif entry & OFFSET_MASK:
            self._release(entry & OFFSET_MASK, self.cluster_size)
        table[index] = target
        self.l2_dirty.add(self._table_offset(pos))

    # -- durability ------------------------------------------------------------------
    def _write_tables(self, dirty: set[int], cache: OrderedDict, as_bytes) -> None:
        for offset in sorted(dirty):
            pwrite_full(self.fd, as_bytes(cache[offset]), offset)
        dirty.clear()

    def sync(self) -> None:
        """Write every cached change to the file in the crash-safe order (module docstring),
        then release the clusters nothing durable references any more."""
        if self.read_only:
            return
        self._write_back()
        self._release_pending()

    def _write_back(self) -> None:
        fd = self.fd
        meta = self.rb_dirty or self.rt_dirty or self.header_dirty or self.l2_dirty \
            or self.l1_dirty
        if self.data_dirty or meta:
            os.fdatasync(fd)
            self.data_dirty = False
        if self.rb_dirty:
            self._write_tables(self.rb_dirty, self.rb_cache, bytes)
            os.fdatasync(fd)
        if self.rt_dirty:
            table = _be_bytes(self.reftable)
            for chunk in sorted({i * 8 // 512 for i in self.rt_dirty}):
                pwrite_full(fd, table[chunk * 512:chunk * 512 + 512],
                            self.rt_offset + chunk * 512)
            self.rt_dirty.clear()
            os.fdatasync(fd)
        if self.header_dirty:
            pwrite_full(fd, struct.pack(">QI", self.rt_offset, self.rt_clusters), 48)
            pwrite_full(fd, struct.pack(">Q", self.size), 24)
            pwrite_full(fd, struct.pack(">IQ", len(self.l1), self.l1_offset), 36)
            self.header_dirty = False
            os.fdatasync(fd)
        if self.l2_dirty:
            self._write_tables(self.l2_dirty, self.l2_cache, _be_bytes)
            os.fdatasync(fd)
        if self.l1_dirty:
            l1 = _be_bytes(self.l1)
            for chunk in sorted({i * 8 // 512 for i in self.l1_dirty}):
                pwrite_full(fd, l1[chunk * 512:chunk * 512 + 512], self.l1_offset + chunk * 512)
            self.l1_dirty.clear()
            os.fdatasync(fd)

    def _release_pending(self) -> None:
        pending, self.pending_free = self.pending_free, []
        for host, length in pending:
            first = host & ~(self.cluster_size - 1)
            for cluster in range(first, host + length, self.cluster_size):
                count = self.refcount(cluster)
                if count == 0:
                    raise self._err(f"refcount underflow on cluster {cluster:#x}")
                self._set_refcount(cluster, count - 1)
                if count == 1:
                    self._l2_set.discard(cluster)
                    self.free_clusters.append(cluster)

    def flush(self) -> None:
        self.sync()

    def set_len(self, size: int) -> None:
        if self.read_only:
            raise self._err("the disk is read-only")
        if size < self.size:
            raise self._err("qcow2 images cannot shrink")
        if size > MAX_SIZE:
            raise self._err(f"size {size} is too large")
        cs = self.cluster_size
        needed = -(-size // (cs * self.l2_entries))
        if needed > len(self.l1):
            if needed * 8 > MAX_L1_BYTES:
                raise self._err(f"size {size} needs an L1 table larger than the maximum")
            # A new, larger L1 at the end; the header switches to it after it is written.
            self.sync()
            old_offset, old_bytes = self.l1_offset, len(self.l1) * 8
            clusters = -(-(needed * 8) // cs)
            new_offset = self.file_end
            self.file_end += clusters * cs
            for i in range(clusters):
                self._set_refcount(new_offset + i * cs, 1)
            self.l1.extend([0] * (needed - len(self.l1)))
            self.sync()   # the refcounts of the new table
            pwrite_full(self.fd, _be_bytes(self.l1), new_offset)
            os.fdatasync(self.fd)
            self.l1_offset = new_offset
            self._fixed_meta[1] = (new_offset, needed * 8)
            self._release(old_offset, -(-old_bytes // cs) * cs)
        self.size = size
        self.header_dirty = True
        self.sync()
        self.sync()

    def close_files(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        if self.fd >= 0 and not self.read_only:
            self.sync()
            self.sync()   # the second one writes the refcounts the first one released
        self.close_files()


def create_qcow2(path: str, size: int | None, backing_file: str | None = None,
                 cluster_bits: int = 16) -> None:
    """Write a new, empty version 3 qcow2 image (`crosvm create_qcow2`).

    With a backing file and no size, the image is as large as the backing file. The
    file must not exist yet."""
    from crosvm.disk import detect_format, open_disk
    cs = 1 << cluster_bits
    backing_format = None
    if backing_file is not None:
        where = backing_file if os.path.isabs(backing_file) else \
            os.path.join(os.path.dirname(path) or ".", backing_file)
        backing = open_disk(where, read_only=True)
        try:
            if size is None:
                size = backing.size
            backing_format = "qcow2" if isinstance(backing, Qcow2Disk) else \
                detect_format(os.pread(backing.fds()[0], 64, 0))
        finally:
            backing.close()
        if backing_format not in ("raw", "qcow2"):
            raise DiskError(f"backing file {backing_file}: {backing_format} images cannot "
                            "be a qcow2 backing file")
        if len(backing_file.encode()) > MAX_BACKING_NAME:
            raise DiskError(f"backing file name is longer than {MAX_BACKING_NAME} bytes")
    if size is None or size <= 0 or size > MAX_SIZE:
        raise DiskError(f"invalid qcow2 image size {size}")
    l1_size = -(-size // (cs * (cs // 8)))
    if l1_size * 8 > MAX_L1_BYTES:
        raise DiskError(f"size {size} is too large for {cs}-byte clusters")
    l1_clusters = max(1, -(-(l1_size * 8) // cs))
    rt_offset, rb_offset, l1_offset = cs, 2 * cs, 3 * cs
    header_length = 112
    ext = b""
    backing_offset = backing_size = 0
    if backing_file is not None:
        fmt = backing_format.encode()
        ext = struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust(
            (len(fmt) + 7) & ~7, b"\0")
        ext += struct.pack(">II", EXT_END, 0)
        backing_offset = header_length + len(ext)
        backing_size = len(backing_file.encode())
    header = HEADER_V2.pack(MAGIC, 3, backing_offset, backing_size, cluster_bits, size, 0,
                            l1_size, l1_offset, rt_offset, 1, 0, 0)
    header += HEADER_V3.pack(0, 0, 0, 4, header_length) + bytes(8)  # compression: deflate
    header += ext + (backing_file.encode() if backing_file is not None else b"")
    refblock = bytearray(cs)
    for i in range(3 + l1_clusters):
        refblock[i * 2:i * 2 + 2] = b"\x00\x01"
    reftable = struct.pack(">Q", rb_offset).ljust(cs, b"\0")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DiskError(f"cannot create {path}: {e.strerror}") from e
    try:
        pwrite_full(fd, header.ljust(cs, b"\0") + reftable + bytes(refblock), 0)
        os.ftruncate(fd, l1_offset + l1_clusters * cs)
        os.fsync(fd)
    finally:
        os.close(fd)
