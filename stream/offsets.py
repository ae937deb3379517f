"""Which offsets are done, per partition, so that a commit never passes a record whose samples are not safe.

A record is done when every part of it is done: each of its samples accepted by the API, dead-lettered
or parked, each with Kafka's or the API's acknowledgement. The committable offset of a partition is its
lowest offset not yet done, or the last offset seen + 1 when all are done. Offsets can have gaps
(compaction, transaction markers), so the tracker never assumes that `offset + 1` exists.

Layout: a partition may buffer a million records, so its pending offsets are packed in two parallel
arrays rather than held as a dict entry, a deque slot and an int object each (~80 bytes a record):

    _offsets  array("q")  offsets of the records tracked with parts, increasing, gaps allowed
    _left     array("i")  parts not yet done for each (0: done); widened to "q" should one pass 2**31 - 1
    _head     every entry before it is done; `committable` moves it over done entries

That is 12 bytes a record (plus ~6% of array headroom). Records with no parts take no entry: only the
highest offset seen moves. Fetches come in offset order, so `track` appends; a rewound record is found by
bisection and revived, or inserted in order. `ack` looks first where the entry found last puts it (the
same offset minus index: right when no gap lies between) and else bisects the few entries it can be in.
`committable` drops the done prefix once it is half of the arrays, which gives the memory back at O(1) a
record amortised. Entries done out of order stay until the head passes them, as they stayed in the deque.
"""

from __future__ import annotations

import bisect
from array import array
from typing import NamedTuple

# The done prefix is dropped once it is at least this long and half of the arrays: shorter ones are not
# worth the copy, and dropping only half-done arrays bounds the copying to one entry per entry dropped.
_COMPACT_MIN = 1024
_INT32_MAX = 2**31 - 1


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class PartitionOffsets:
    """Pending offsets of one partition for one assignment.

    A new assignment of the same partition gets a new object, and a revoked one is closed: an
    acknowledgement that arrives late for an old assignment lands on the closed object and moves nothing.
    """

    __slots__ = ("_delta", "_done", "_found", "_head", "_left", "_offsets", "_seen", "closed", "committed", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self._offsets = array("q")  # offsets tracked with parts, increasing
        self._left = array("i")  # parts not yet done, one per offset (0: done)
        self._head = 0  # every entry before it is done
        self._done = 0  # entries done still in the arrays: the others are pending
        self._found = 0  # index of the entry the last search found: where the next one starts (a hint)
        self._delta = 0  # its offset minus its index: where the next ack looks first (a hint)
        self._seen: int | None = None  # highest offset tracked
        self.closed = False
        self.committed: int | None = None  # last offset committed for this assignment

    def track(self, offset: int, parts: int) -> None:
        """A fetched record that becomes done after `parts` acknowledgements (0: done already)."""
        seen = self._seen
        if seen is None or offset > seen:
            self._seen = offset
            if parts > 0:
                try:  # the parts first: should they not fit, the arrays stay in step
                    self._left.append(parts)
                except OverflowError:
                    self._fit(parts)
                    self._left.append(parts)
                self._offsets.append(offset)
        elif parts > 0:
            self._track_again(offset, parts)

    def _track_again(self, offset: int, parts: int) -> None:
        # The record comes again within one assignment (the client rewound its position): its new parts
        # must hold commits back like the first ones, or a commit could pass samples still in memory.
        # The done prefix is searched too: it is in offset order all the same, and its entries can revive.
        offsets = self._offsets
        i = bisect.bisect_left(offsets, offset)
        if i < len(offsets) and offsets[i] == offset:
            was = self._left[i]
            self._fit(was + parts)
            self._left[i] = was + parts
            if not was:
                self._done -= 1
        else:
            self._fit(parts)
            self._left.insert(i, parts)
            offsets.insert(i, offset)
        if i < self._head:  # pending again, or new, before the head: the head must not pass it
            self._head = i

    def _fit(self, parts: int) -> None:
        # Over 2**31 - 1 parts for one record: never seen in practice, yet counted exactly rather than refused.
        if parts > _INT32_MAX and self._left.typecode == "i":
            self._left = array("q", self._left)

    def ack(self, offset: int, parts: int = 1) -> None:
        if self.closed:
            return
        offsets = self._offsets
        # Acks mostly come for the record of the last one or its neighbours: one look, no search.
        i = offset - self._delta
        if not (0 <= i < len(offsets) and offsets[i] == offset):
            i = self._find(offset)
            if i < 0:
                return
        left = self._left
        remaining = left[i]
        if remaining > parts:
            left[i] = remaining - parts
        elif remaining:  # an over-ack finishes it like an exact one; one for a done entry moves nothing
            left[i] = 0
            self._done += 1

    def _find(self, offset: int) -> int:
        """The index of `offset` from the head on, or -1 (before the head all is done: acks there move nothing)."""
        offsets, lo, hi = self._offsets, self._head, len(self._offsets)
        if lo >= hi:
            return -1
        k = self._found
        if not lo <= k < hi:
            k = lo
        # Offsets rise by 1 an entry or more, so an entry bounds where `offset` can be: at most as many
        # entries away as their offsets differ. Bounded so from each side (the entry found last and one end),
        # the search covers only as many entries as offsets are missing between them: few, mostly.
        at = offsets[k]
        if offset >= at:
            lo, hi = max(k, hi - 1 - (offsets[hi - 1] - offset)), min(hi, k + 1 + offset - at)
        else:
            lo, hi = max(lo, k - (at - offset)), min(k, lo + 1 + offset - offsets[lo])
        if lo >= hi:
            return -1
        i = bisect.bisect_left(offsets, offset, lo, hi)
        if i == hi or offsets[i] != offset:
            return -1
        self._found, self._delta = i, offset - i
        return i

    def committable(self) -> int | None:
        """The offset to commit (the next one to read), or None before any record was seen."""
        offsets, left, head = self._offsets, self._left, self._head
        n = len(offsets)
        while head < n and not left[head]:
            head += 1
        if head >= _COMPACT_MIN and 2 * head >= n:
            del offsets[:head]
            del left[:head]
            self._done -= head
            self._found -= head  # the hints follow their entries down
            self._delta += head
            head = 0
        self._head = head
        if head < len(offsets):
            return offsets[head]
        return None if self._seen is None else self._seen + 1

    @property
    def pending(self) -> int:
        return len(self._offsets) - self._done

    @property
    def fetched(self) -> int | None:
        """The offset after the highest one tracked (where reading goes on), or None before any record."""
        return None if self._seen is None else self._seen + 1


class OffsetTracker:
    """The live PartitionOffsets of the partitions this consumer holds now."""

    def __init__(self) -> None:
        self._live: dict[TopicPartition, PartitionOffsets] = {}

    def assign(self, tp: TopicPartition) -> PartitionOffsets:
        old = self._live.get(tp)
        if old is not None:
            return old
        state = self._live[tp] = PartitionOffsets(tp)
        return state

    def revoke(self, tp: TopicPartition) -> PartitionOffsets | None:
        state = self._live.pop(tp, None)
        if state is not None:
            state.closed = True
        return state

    def get(self, tp: TopicPartition) -> PartitionOffsets | None:
        return self._live.get(tp)

    def partitions(self) -> list[TopicPartition]:
        return list(self._live)

    def to_commit(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets that moved since the last commit, for live partitions (all, or those in `only`)."""
        out: dict[TopicPartition, int] = {}
        for tp, state in self._live.items():
            if only is not None and tp not in only:
                continue
            offset = state.committable()
            if offset is not None and offset != state.committed:
                out[tp] = offset
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._live.get(tp)
            if state is not None:
                state.committed = offset

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self._live.values())
