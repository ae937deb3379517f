"""Which offsets are done, per partition, so that a commit never passes a record whose samples are not safe.

A record is done when every part of it is done: each of its samples accepted by the API, dead-lettered
or parked, each with Kafka's or the API's acknowledgement. The committable offset of a partition is its
lowest offset not yet done, or the last offset seen + 1 when all are done. Offsets can have gaps
(compaction, transaction markers), so the tracker never assumes that `offset + 1` exists.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import NamedTuple


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class PartitionOffsets:
    """Pending offsets of one partition for one assignment.

    A new assignment of the same partition gets a new object, and a revoked one is closed: an
    acknowledgement that arrives late for an old assignment lands on the closed object and moves nothing.
    """

    __slots__ = ("_order", "_remaining", "_seen", "closed", "committed", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self._order: deque[int] = deque()  # offsets in fetch order, the oldest possibly done
        self._remaining: dict[int, int] = {}  # offset -> parts not yet done
        self._seen: int | None = None  # highest offset tracked
        self.closed = False
        self.committed: int | None = None  # last offset committed for this assignment

    def track(self, offset: int, parts: int) -> None:
        """A fetched record that becomes done after `parts` acknowledgements (0: done already)."""
        if self._seen is None or offset > self._seen:
            self._seen = offset
            if parts > 0:
                self._order.append(offset)
                self._remaining[offset] = parts
        elif parts > 0:
            self._track_again(offset, parts)

    def _track_again(self, offset: int, parts: int) -> None:
        # The record comes again within one assignment (the client rewound its position): its new parts
        # must hold commits back like the first ones, or a commit could pass samples still in memory.
        if offset in self._remaining:
            self._remaining[offset] += parts
            return
        self._remaining[offset] = parts
        self._order.insert(bisect.bisect_left(self._order, offset), offset)

    def ack(self, offset: int, parts: int = 1) -> None:
        if self.closed:
            return
        left = self._remaining.get(offset)
        if left is None:
            return
        if left > parts:
            self._remaining[offset] = left - parts
        else:
            del self._remaining[offset]

    def committable(self) -> int | None:
        """The offset to commit (the next one to read), or None before any record was seen."""
        order, remaining = self._order, self._remaining
        while order and order[0] not in remaining:
            order.popleft()
        if order:
            return order[0]
        return None if self._seen is None else self._seen + 1

    @property
    def pending(self) -> int:
        return len(self._remaining)


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
