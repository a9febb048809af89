"""uid/gid maps for shared directories, in user-namespace form ("inner outer count").

crosvm's `--shared-dir ...:uidmap=0 1000 1` is the uid_map of the device's user
namespace: guest (inner) id 0 is host (outer) id 1000. Without the sandbox there is no
namespace, so the file servers translate themselves with the same map; in the sandbox
the kernel translates and the servers see the inner ids (`IdMap.inner_only`).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

# What the kernel shows for an id with no mapping (/proc/sys/kernel/overflowuid).
OVERFLOW_ID = 65534
MAX_ID = 0xFFFF_FFFF
MAX_RANGES = 340  # the kernel's limit on uid_map lines


class IdMapError(ValueError):
    """A map that cannot be parsed; the message names the bad part."""


@dataclass(frozen=True)
class IdRange:
    inner: int
    outer: int
    count: int


class IdMap:
    """Translates ids between the guest (inner) and the host files (outer)."""

    def __init__(self, ranges: list[IdRange], fallback: int | None = None) -> None:
        self.ranges = list(ranges)
        # The owner of what a guest with an unmapped id creates: the device's own
        # identity (in the sandbox the process already is it, so None there).
        self.fallback = fallback

    @classmethod
    def parse(cls, text: str) -> "IdMap":
        """`inner outer count` triples, separated by commas or newlines."""
        ranges = []
        for part in text.replace("\n", ",").split(","):
            if not part.strip():
                continue
            fields = part.split()
            if len(fields) != 3 or not all(f.isascii() and f.isdigit() for f in fields):
                raise IdMapError(f"{part.strip()!r} is not 'inner outer count'")
            inner, outer, count = (int(f) for f in fields)
            if count == 0 or inner + count - 1 > MAX_ID or outer + count - 1 > MAX_ID:
                raise IdMapError(f"{part.strip()!r}: empty or beyond 2^32-1")
            ranges.append(IdRange(inner, outer, count))
        if not ranges:
            raise IdMapError("no ranges")
        if len(ranges) > MAX_RANGES:
            raise IdMapError(f"more than {MAX_RANGES} ranges")
        for key in ("inner", "outer"):
            spans = sorted((getattr(r, key), getattr(r, key) + r.count) for r in ranges)
            if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
                raise IdMapError(f"{key} ranges overlap")
        return cls(ranges)

    @classmethod
    def identity(cls) -> "IdMap":
        return cls([IdRange(0, 0, MAX_ID)])

    def inner_only(self) -> "IdMap":
        """The map a server inside the user namespace uses: the kernel has translated
        already, so inner ids stand for themselves (and only mapped ones exist)."""
        return IdMap([IdRange(r.inner, r.inner, r.count) for r in self.ranges])

    def to_host(self, inner: int) -> int | None:
        """The host id for guest id `inner`, or None when it has no mapping."""
        for r in self.ranges:
            if r.inner <= inner < r.inner + r.count:
                return r.outer + inner - r.inner
        return None

    def owner_for(self, inner: int) -> int | None:
        """The host owner of a node guest id `inner` creates: its mapping, else the
        device's identity (`fallback`); None means leave the process's own."""
        host = self.to_host(inner)
        return self.fallback if host is None else host

    def with_fallback(self, inner: int) -> "IdMap":
        """This map, with new nodes of unmapped guest ids owned by what `inner` (the
        device's uid= or gid=) maps to."""
        return IdMap(self.ranges, self.to_host(inner))

    def to_guest(self, outer: int) -> int:
        """The guest id for host id `outer` (OVERFLOW_ID when it has no mapping)."""
        for r in self.ranges:
            if r.outer <= outer < r.outer + r.count:
                return r.inner + outer - r.outer
        return OVERFLOW_ID

    def proc_text(self) -> str:
        """The map as /proc/PID/uid_map takes it."""
        return "".join(f"{r.inner} {r.outer} {r.count}\n" for r in self.ranges)


def host_owner(uid_map: IdMap, gid_map: IdMap, uid: int | None,
               gid: int | None) -> tuple[int, int]:
    """(uid, gid) for a chown the guest asks for (None: leave it, -1 to chown); an id
    with no host mapping is EINVAL, as the kernel answers in a user namespace."""
    host_uid = -1 if uid is None else uid_map.to_host(uid)
    host_gid = -1 if gid is None else gid_map.to_host(gid)
    if host_uid is None or host_gid is None:
        raise OSError(errno.EINVAL, "the id has no host mapping")
    return host_uid, host_gid
