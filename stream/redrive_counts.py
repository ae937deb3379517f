"""The redrive counts of the records `stream redrive` sent back that the service holds uncommitted: per partition,
two parallel arrays (offsets increasing, counts), appended at intake (fetches come in offset order), cut from
the front at commit and dropped whole at revoke, looked up by bisection. 16 bytes an entry, no work per commit
beyond the entries it drops."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Hashable, Iterable, Mapping


class RedriveCounts:
    __slots__ = ("_by_tp", "_size")

    def __init__(self) -> None:
        self._by_tp: dict[Hashable, tuple[array, array]] = {}  # tp -> (offsets, counts)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def add(self, tp: Hashable, offset: int, count: int) -> None:
        pair = self._by_tp.get(tp)
        if pair is None:
            pair = self._by_tp[tp] = (array("q"), array("q"))
        offsets, counts = pair
        if not offsets or offset > offsets[-1]:
            offsets.append(offset)
            counts.append(count)
            self._size += 1
            return
        i = bisect_left(offsets, offset)  # read again (a seek back): kept in order
        if i < len(offsets) and offsets[i] == offset:
            counts[i] = count
        else:
            offsets.insert(i, offset)
            counts.insert(i, count)
            self._size += 1

    def get(self, tp: Hashable, offset: int) -> int | None:
        pair = self._by_tp.get(tp)
        if pair is None:
            return None
        offsets, counts = pair
        i = bisect_left(offsets, offset)
        return counts[i] if i < len(offsets) and offsets[i] == offset else None

    def committed(self, offsets: Mapping[Hashable, int]) -> None:
        """Drop the entries below each partition's committed offset."""
        for tp, committed in offsets.items():
            pair = self._by_tp.get(tp)
            if pair is None:
                continue
            i = bisect_left(pair[0], committed)
            if i == len(pair[0]):
                del self._by_tp[tp]
            elif i:
                del pair[0][:i]
                del pair[1][:i]
            self._size -= i

    def revoked(self, tps: Iterable[Hashable]) -> None:
        for tp in tps:
            pair = self._by_tp.pop(tp, None)
            if pair is not None:
                self._size -= len(pair[0])

    def items(self) -> list[tuple[Hashable, int, int]]:
        """(tp, offset, count) of every entry: for tests and debugging."""
        return [(tp, o, c) for tp, (offsets, counts) in self._by_tp.items() for o, c in zip(offsets, counts,
                                                                                             strict=True)]
