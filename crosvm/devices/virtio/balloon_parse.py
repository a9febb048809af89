"""Pure parsers for what a virtio-balloon driver sends (virtio 1.x, 5.5): page frame
number arrays on the inflate/deflate queues and the stats buffer, and the checks that
the pages named are RAM the guest may give back. Hostile input gives a ValueError or
is bounded, never an unbounded allocation."""

from __future__ import annotations

import struct

PAGE_SHIFT = 12           # balloon PFNs are always 4 KiB pages, whatever the guest uses
PAGE_SIZE = 1 << PAGE_SHIFT
PFN_BYTES = 4
MAX_PFNS = 1 << 16        # per chain: 256 KiB of PFNs; Linux sends at most 256
MAX_PFN_BYTES = MAX_PFNS * PFN_BYTES
STAT = struct.Struct("<HQ")
MAX_STATS = 64            # the spec has 10 tags; a longer buffer is read this far only
MAX_STATS_BYTES = MAX_STATS * STAT.size

# Stat tags (5.5.6.3) -> crosvm's BalloonStats field names.
STAT_NAMES = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
              4: "free_memory", 5: "total_memory", 6: "available_memory", 7: "disk_caches",
              8: "hugetlb_allocations", 9: "hugetlb_failures",
              # crosvm's nonstandard tags (ChromeOS guest kernels)
              0xFFFE: "shared_memory", 0xFFFF: "unevictable_memory"}
STAT_FIELDS = ("swap_in", "swap_out", "major_faults", "minor_faults", "free_memory",
               "total_memory", "available_memory", "disk_caches", "hugetlb_allocations",
               "hugetlb_failures", "shared_memory", "unevictable_memory")


def parse_pfns(data: bytes) -> list[int]:
    """The little-endian u32 PFNs in `data`; ValueError for a partial one or too many."""
    if len(data) % PFN_BYTES:
        raise ValueError(f"PFN array of {len(data)} bytes is not a multiple of {PFN_BYTES}")
    if len(data) // PFN_BYTES > MAX_PFNS:
        raise ValueError(f"more than {MAX_PFNS} PFNs in one buffer")
    return list(struct.unpack(f"<{len(data) // PFN_BYTES}I", data))


def usable_ram(listed: list[tuple[int, int]],
               backed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages, as sorted (address, length) ranges, that are both in `listed`
    (RAM in the memory map the guest sees) and in `backed` (the guest-memory regions).
    Each result lies inside one backed region, so it can be released in one call."""
    out = []
    for a, an in sorted(listed):
        for b, bn in sorted(backed):
            start = -(-max(a, b) // PAGE_SIZE) * PAGE_SIZE
            end = min(a + an, b + bn) // PAGE_SIZE * PAGE_SIZE
            if start < end:
                out.append((start, end - start))
    return sorted(out)


def containing(ram: list[tuple[int, int]], addr: int, length: int) -> int | None:
    """The index of the range of `ram` that holds all of [addr, addr+length), if any."""
    for i, (start, size) in enumerate(ram):
        if start <= addr and addr + length <= start + size:
            return i
    return None


def page_ranges(pfns: list[int], ram: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(guest address, length) runs of contiguous pages, in order, each inside one range
    of `ram` (see usable_ram); ValueError for a page not wholly inside one."""
    runs: list[tuple[int, int]] = []
    last = None  # the ram range of the current run: a run never spans two
    for pfn in pfns:
        addr = pfn << PAGE_SHIFT
        if last is not None and ram[last][0] <= addr <= ram[last][0] + ram[last][1] - PAGE_SIZE:
            where = last  # the usual case: the same range as the page before
        else:
            where = containing(ram, addr, PAGE_SIZE)
        if where is None:
            raise ValueError(f"PFN {pfn:#x} is not guest RAM")
        if runs and where == last and runs[-1][0] + runs[-1][1] == addr:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        else:
            runs.append((addr, PAGE_SIZE))
        last = where
    return runs


def parse_stats(data: bytes) -> dict[str, int]:
    """crosvm field name -> value for the known tags in a stats buffer (unknown tags
    are skipped, a trailing partial entry ignored, at most MAX_STATS entries read)."""
    stats: dict[str, int] = {}
    count = min(len(data) // STAT.size, MAX_STATS)
    for i in range(count):
        tag, value = STAT.unpack_from(data, i * STAT.size)
        name = STAT_NAMES.get(tag)
        if name is not None:
            stats[name] = value
    return stats
