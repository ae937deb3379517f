"""Per-(user_id, data_type) buffers and the decisions of when each leaves: pure, time passed in as `now`.

A buffer leaves as a batch when it holds `max_samples` ("full") or its oldest sample has waited `window`
seconds ("window"). One batch per key is in flight at a time, so a key's batches reach the API in order.
A buffer that cannot reach the API's minimum of 3 samples waits `hold` seconds for more, then is handed
out to be parked (written to the pending topic, to come back and join later samples); each of its samples
older than `max_age` (wall clock since the sample was first seen, kept across parking) is handed out to
be dead-lettered instead. Every sample is aged by its own birth: a fresh sample that joins a tail about
to expire is parked again, not expired with it.

A tail that came back from the pending topic (every sample of it read from there: `rests` says which sources
those are) is not parked again at the end of its hold: it **rests** in memory, joined by the key's next samples
as soon as they arrive, until it expires, is taken (revoke, shutdown) or the resting tails exceed `max_resting`
samples, when the ones resting longest are parked first. Its samples' pending-topic offsets stay unacknowledged
meanwhile: only the pending topic's own commit waits, and a replay of it after a crash is what should happen.
Without it, a lonely tail went round the pending topic once per hold (2,880 records a day).

Two copies of one sample (byte-identical after validation: a producer's re-send, a parked copy meeting
its original) never go out together: the copy rides along as a twin and shares its original's fate.

Buffered samples are packed, not objects: each buffer is one bytearray holding, per sample, a fixed header
(the body's length, start, source offset, Kafka timestamp, birth, and an index into a table of sources)
followed by the sample's API bytes. With a million keys of 1-2 samples waiting to fill batches, an object per
sample (an Entry, its int and float fields, a list per record) cost three times the sample's own bytes; the
packed form costs 40 bytes on top of them. Entries are built only when a buffer leaves (a batch, a tail),
which is where every sample's fields are needed anyway.

Deadlines cost O(1) per buffer and no task or timer: every buffer gets the same window, so buffers wait
in a FIFO queue in the order they were created, and those still too small at their window move, in the
same order, to a second FIFO queue for the hold. The rare buffer that needs a second look (its batch came
back, or a rebalance took samples out of it) goes into a small heap. An entry whose buffer is gone is
skipped when it comes up.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec

MIN_SAMPLES = 3  # the API refuses a request with fewer samples
# A tail rests at most this long before it is parked anew (8 pending records a day): the pending partition's
# commit, what a crash replays of it, and the offsets tracked meanwhile stay bounded to a few hours.
MAX_REST_SECONDS = 3 * 3600.0

Key = tuple[str, str]  # (user_id, data_type)


class Entry(msgspec.Struct, gc=False):
    """One sample on its way out of the buffers: its sort key, its encoded API bytes, and where it came from
    (for the ack). Buffered samples are packed (see _HEAD); an Entry is built when its buffer leaves."""

    start: int  # epoch nanoseconds
    body: bytes
    source: Any  # opaque here: the offsets' PartitionOffsets
    offset: int
    timestamp: float  # the record's Kafka timestamp (seconds), for the end-to-end latency
    born: float = 0.0  # wall time the sample was first seen, kept across parking (its max age counts from it)


Twins = list[tuple[Entry, Entry]]  # (the sample that goes out, a byte-identical copy that shares its fate)


class Batch(NamedTuple):
    key: Key
    entries: list[Entry]  # chronological by start_date, no two identical
    reason: str  # full | window | revoke | shutdown
    twins: Twins = []  # never mutated: a fresh list is built when there are twins


class Small(NamedTuple):
    """1-2 samples of a key handed out to be parked or dead-lettered (each carries its own birth)."""

    key: Key
    entries: list[Entry]
    twins: Twins = []  # never mutated

    @property
    def born(self) -> float:
        return min(e.born for e in self.entries)


class Work(NamedTuple):
    batches: list[Batch]
    park: list[Small]
    expire: list[Small]


_by_start = attrgetter("start")


# A packed sample's header: its body's length (the top bit set when the start did not fit an int64, whose low
# 32 bits then follow the header: _LOW), start in epoch ns, source offset, Kafka timestamp (s), birth (s), and
# the index of its source in the batcher's table of sources. The sample's API bytes follow.
_HEAD = struct.Struct("<IqqddI")
_LOW = struct.Struct("<I")
_WIDE = 1 << 31
_MIXED = -1  # a buffer's `source` when its samples come from more than one source


def _size(buffer: _Buffer) -> int:
    return buffer.count


class _Buffer(bytearray):
    """One key's buffered samples, packed (a bytearray: one object for all of them)."""

    __slots__ = ("count", "key", "rest_until", "since", "source")

    key: Key
    since: float  # monotonic time the oldest buffered sample arrived (window and hold)
    count: int  # samples packed
    source: int  # index of the source every sample comes from, or _MIXED
    rest_until: float  # while it rests: the wall time its oldest sample expires; else 0


def _new_buffer(key: Key, since: float, source: int) -> _Buffer:
    buffer = _Buffer()
    buffer.key, buffer.since, buffer.count, buffer.source, buffer.rest_until = key, since, 0, source, 0.0
    return buffer


def _pack(buffer: _Buffer, start: int, body: bytes, offset: int, timestamp: float, born: float, source: int) -> None:
    try:
        buffer += _HEAD.pack(len(body), start, offset, timestamp, born, source)
    except struct.error:
        if type(start) is not int or -(2**95) > start or start >= 2**95:
            raise
        # A start beyond 1677..2262 (a valid RFC 3339 date can be year 1 or 9999): packed in two parts.
        buffer += _HEAD.pack(len(body) | _WIDE, start >> 32, offset, timestamp, born, source)
        buffer += _LOW.pack(start & 0xFFFFFFFF)
    buffer += body


def plan_take(n: int, max_samples: int) -> int:
    """How many of n buffered samples the next batch takes, so that no remainder is left below 3.

    1001 with a maximum of 1000 becomes 998 now and 3 next, rather than 1000 and a stranded 1. Where no
    split avoids it (4 with a maximum of 3), the batch is full and the remainder waits for more samples.
    """
    if n <= max_samples:
        return n
    if n - max_samples < MIN_SAMPLES and n - MIN_SAMPLES >= MIN_SAMPLES:
        return n - MIN_SAMPLES
    return max_samples


class Batcher:
    def __init__(self, max_samples: int, window: float, hold: float, max_age: float,
                 rests: Callable[[Any], bool] | None = None, max_resting: int = 0,
                 catch_up_window: float | None = None) -> None:
        """`rests`: whether samples from a source may rest in memory past their hold (the pending topic's);
        `max_resting`: at most this many resting samples (0: none rests); `catch_up_window`: the window while
        `catching_up` (default: the window)."""
        if not MIN_SAMPLES <= max_samples <= 1000:
            raise ValueError("max_samples must be within 3..1000")
        self.max_samples = max_samples
        self.window = window
        self.hold = hold
        self.max_age = max_age
        self.catch_up_window = max(window, catch_up_window or window)
        self._catching_up = False
        self._window = window  # the window in force: `window`, or `catch_up_window` while catching up
        self._rests = rests
        self.max_resting = max_resting if rests is not None else 0
        self._restable: set[int] = set()  # indices of the sources whose samples may rest
        self._resting: dict[Key, _Buffer] = {}  # resting tails, the longest resting first
        self._resting_samples = 0
        self._expiry: list[tuple[float, int, _Buffer]] = []  # (rest_until, tie-breaker, buffer): resting tails
        self._buffers: dict[Key, _Buffer] = {}
        self._window_queue: deque[_Buffer] = deque()  # due at since + window, in creation order
        self._hold_queue: deque[_Buffer] = deque()  # still below 3 at their window: due at since + hold
        self._recheck: list[tuple[float, int, _Buffer]] = []  # (when, tie-breaker, buffer): a second look
        self._rechecks = 0
        self._ready: dict[Key, str] = {}  # keys whose buffer may leave now, in arrival order -> reason
        self._in_flight: set[Key] = set()
        self._samples = 0
        self._flush_reason: str | None = None  # set while draining everything (shutdown)
        # Copies set aside while their original is still buffered (rare: the batch or small that takes the
        # original takes them along). Still counted as buffered samples, not as their buffer's.
        self._twins: dict[Key, Twins] = {}
        # Packed samples name their source (the offsets of one partition's assignment) by an index: a few per
        # assignment, dropped with the assignment's samples (drop_sources).
        self._sources: dict[int, Any] = {}
        self._index_of: dict[Any, int] = {}
        self._next_source = 0

    @property
    def catching_up(self) -> bool:
        return self._catching_up

    def set_catching_up(self, value: bool, now: float) -> None:
        """While the service is behind (a backlog), buffers wait up to the catch-up window rather than the window:
        with many keys, each buffer gets a sample now and then, and leaving at the window made requests of a
        few samples. They still leave when full and, the fullest first, when memory is needed. Once caught up,
        what waited past the window leaves at the next poll."""
        self._catching_up = value
        self._window = self.catch_up_window if value else self.window
        if not value:  # those waiting in the recheck heap for the catch-up window too
            for key, buffer in self._buffers.items():
                if (buffer.count >= MIN_SAMPLES and now >= buffer.since + self.window
                        and key not in self._in_flight and not buffer.rest_until):
                    self._ready.setdefault(key, "window")

    # -- intake ---------------------------------------------------------------------------------------

    def add_samples(self, key: Key, samples: list[Any], source: Any, offset: int, timestamp: float,
                    born: float | list[float], now: float) -> None:
        """Buffer one record's valid samples (objects with `start` and `body`), all from `offset` of `source`,
        born at `born` (one birth for all, or one each). The hot path: no object per sample."""
        index = self._index_of.get(source)
        if index is None:
            index = self._source_index(source)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _new_buffer(key, now, index)
            self._window_queue.append(buffer)
        elif buffer.source != index:
            buffer.source = _MIXED
        before = len(buffer)
        pack = _HEAD.pack
        try:
            if type(born) is list:
                for sample, birth in zip(samples, born, strict=True):
                    _pack(buffer, sample.start, sample.body, offset, timestamp, birth, index)
            else:
                for sample in samples:
                    body = sample.body
                    try:
                        buffer += pack(len(body), sample.start, offset, timestamp, born, index)
                    except struct.error:
                        _pack(buffer, sample.start, body, offset, timestamp, born, index)
                        continue
                    buffer += body
        except BaseException:
            self._undo(key, buffer, before)
            raise
        self._added(key, buffer, len(samples), now)

    def add(self, key: Key, entries: list[Entry], now: float) -> None:
        """Buffer samples handed back as entries (a refused batch's held samples, a screened remainder; starts
        are ints: epoch nanoseconds)."""
        if not entries:
            return
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _new_buffer(key, now, self._source_index(entries[0].source))
            self._window_queue.append(buffer)
        before = len(buffer)
        try:
            self._pack_entries(buffer, entries)
        except BaseException:
            self._undo(key, buffer, before)
            raise
        self._added(key, buffer, len(entries), now)

    def _undo(self, key: Key, buffer: _Buffer, size: int) -> None:
        """A record that could not be packed whole leaves nothing behind: a half-counted buffer would drift."""
        del buffer[size:]
        if not size:
            del self._buffers[key]  # its deadline queue entry is skipped: not the key's live buffer

    def _added(self, key: Key, buffer: _Buffer, samples: int, now: float) -> None:
        if buffer.rest_until:
            self._wake(buffer)
            if buffer.count + samples < MIN_SAMPLES:  # still a tail: the newcomers get their own hold
                self._look_again(buffer, now, now + self.hold)
        buffer.count += samples
        self._samples += samples
        if key in self._in_flight:
            return  # done() decides when the key's batch returns
        size = buffer.count
        if size >= self.max_samples:
            self._ready[key] = "full"
        elif size >= MIN_SAMPLES and now >= buffer.since + self._window:
            # Its window timer already fired while it was too small to send; it can go now.
            self._ready.setdefault(key, "window")

    # -- decisions ------------------------------------------------------------------------------------

    def poll(self, now: float, wall: float, slots: int) -> Work:
        """What leaves now: at most `slots` batches, plus small buffers to park or to expire."""
        work = Work([], [], [])
        self._fire_timers(now, wall, work)
        while slots > 0 and self._ready:
            key, reason = next(iter(self._ready.items()))
            del self._ready[key]
            batch = self._take_batch(key, reason, work)
            if batch is not None:
                work.batches.append(batch)
                slots -= 1
        return work

    def done(self, key: Key, now: float) -> None:
        """The key's batch in flight is finished (accepted, refused or given up): its next may go."""
        self._in_flight.discard(key)
        buffer = self._buffers.get(key)
        if buffer is None:
            return
        size = buffer.count
        if size >= self.max_samples:
            self._ready[key] = "full"
        elif size >= MIN_SAMPLES and (self._flush_reason or now >= buffer.since + self._window):
            self._ready[key] = self._flush_reason or "window"
        else:
            self._look_again(buffer, now)

    def flush_all(self, reason: str) -> None:
        """Mark every buffer that can make a request as ready now (shutdown, revoke)."""
        self._flush_reason = reason
        for key, buffer in self._buffers.items():
            if buffer.count >= MIN_SAMPLES and key not in self._in_flight:
                self._ready.setdefault(key, reason)

    def flush_keys(self, keys: set[Key], reason: str) -> None:
        for key in keys:
            buffer = self._buffers.get(key)
            if buffer is not None and buffer.count >= MIN_SAMPLES and key not in self._in_flight:
                self._ready.setdefault(key, reason)

    def flush_largest(self, samples: int, reason: str) -> int:
        """Mark ready the fullest buffers that can make a request, until those ready hold `samples` (memory
        pressure): the largest batches free the memory needed with the fewest requests, and the smaller
        buffers go on filling. Returns the samples of the buffers ready now (fewer when not enough can go)."""
        ready = sum(b.count for k in self._ready if (b := self._buffers.get(k)) is not None)
        if ready >= samples:
            return ready
        candidates = [b for k, b in self._buffers.items()
                      if b.count >= MIN_SAMPLES and k not in self._in_flight and k not in self._ready]
        candidates.sort(key=_size, reverse=True)
        for buffer in candidates:
            self._ready[buffer.key] = reason
            ready += buffer.count
            if ready >= samples:
                break
        return ready

    def take_small(self, keys: set[Key] | None = None, resting_only: bool = False) -> list[Small]:
        """Every idle buffer of 1-2 samples (or only the resting ones), of all keys or of `keys` (at shutdown
        and revoke: they get parked rather than held in memory)."""
        out = []
        candidates = list(self._buffers.items()) if keys is None else [
            (k, b) for k in keys if (b := self._buffers.get(k)) is not None
        ]
        for key, buffer in candidates:
            if buffer.count < MIN_SAMPLES and key not in self._in_flight and (buffer.rest_until or not resting_only):
                out.append(self._remove(key, buffer))
        return out

    def drop_sources(self, sources: set[Any], now: float) -> int:
        """Forget samples that came from revoked partitions (their new owner reads them again)."""
        dropped = 0
        for key, waiting in list(self._twins.items()):
            # A copy from a partition still held whose original is dropped becomes a sample of its own.
            orphans = [copy for original, copy in waiting if original.source in sources and copy.source not in sources]
            kept_twins = [t for t in waiting if t[0].source not in sources and t[1].source not in sources]
            dropped += len(waiting) - len(kept_twins) - len(orphans)
            if kept_twins:
                self._twins[key] = kept_twins
            else:
                del self._twins[key]
            if orphans:
                buffer = self._buffers.get(key)
                if buffer is None:
                    buffer = self._buffers[key] = _new_buffer(key, now, self._source_index(orphans[0].source))
                    self._look_again(buffer, now)
                elif buffer.rest_until:  # a sample of its own now, from wherever: looked at afresh
                    self._wake(buffer)
                    self._look_again(buffer, now, now + self.hold)
                self._pack_entries(buffer, orphans)
                buffer.count += len(orphans)
        gone = {index for source in sources if (index := self._index_of.get(source)) is not None}
        for key, buffer in list(self._buffers.items()):
            if buffer.source == _MIXED:
                entries = self._unpack(buffer)
                kept = [e for e in entries if e.source not in sources]
                if len(kept) == len(entries):
                    continue
            elif buffer.source in gone:
                kept = []
            else:
                continue
            dropped += buffer.count - len(kept)
            if buffer.rest_until:
                self._wake(buffer)
            self._repack(buffer, kept)
            if not kept:
                del self._buffers[key]  # done() copes with a key whose buffer is gone
                self._ready.pop(key, None)
            else:
                # What is left may be too small now, or its deadlines may have passed: look at it again.
                self._look_again(buffer, buffer.since)
        for source in sources:  # no buffered sample names them any more
            index = self._index_of.pop(source, None)
            if index is not None:
                del self._sources[index]
        self._samples -= dropped
        return dropped

    def keys(self) -> set[Key]:
        return set(self._buffers)

    def keys_with_sources(self, sources: set[Any]) -> set[Key]:
        indices = {index for source in sources if (index := self._index_of.get(source)) is not None}
        return {k for k, b in self._buffers.items() if b.source in indices or (
            b.source == _MIXED and any(e.source in sources for e in self._unpack(b)))}

    # -- state for metrics and shutdown ---------------------------------------------------------------

    @property
    def buffered_samples(self) -> int:
        return self._samples

    @property
    def buffers(self) -> int:
        return len(self._buffers)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def resting_samples(self) -> int:
        """Samples of tails resting in memory (counted in `buffered_samples` too)."""
        return self._resting_samples

    @property
    def resting_tails(self) -> int:
        return len(self._resting)

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    def oldest_since(self) -> float | None:
        """When the oldest buffered sample arrived, resting tails aside (they wait for their user by design; a
        scrape's figure, O(buffers))."""
        return min((b.since for b in self._buffers.values() if not b.rest_until), default=None)

    # -- internals ------------------------------------------------------------------------------------

    def _source_index(self, source: Any) -> int:
        index = self._index_of.get(source)
        if index is None:
            index = self._index_of[source] = self._next_source
            self._sources[index] = source
            self._next_source += 1
            if self._rests is not None and self._rests(source):
                self._restable.add(index)
        return index

    def _pack_entries(self, buffer: _Buffer, entries: list[Entry]) -> None:
        """Append entries to a buffer (its count is the caller's to raise)."""
        for e in entries:
            index = self._source_index(e.source)
            if index != buffer.source:
                buffer.source = _MIXED
            _pack(buffer, e.start, e.body, e.offset, e.timestamp, e.born, index)

    def _repack(self, buffer: _Buffer, entries: list[Entry]) -> None:
        """Make a buffer hold exactly `entries` (what is left of it)."""
        del buffer[:]
        buffer.count = len(entries)
        if entries:
            buffer.source = self._index_of[entries[0].source]
            self._pack_entries(buffer, entries)

    def _unpack(self, buffer: _Buffer) -> list[Entry]:
        """The buffer's samples as entries, in the order they were buffered."""
        data = bytes(buffer)  # one copy: slices of bytes are the bodies themselves
        sources, unpack, head = self._sources, _HEAD.unpack_from, _HEAD.size
        out = []
        at, end = 0, len(data)
        while at < end:
            length, start, offset, timestamp, born, index = unpack(data, at)
            at += head
            if length & _WIDE:
                length ^= _WIDE
                start = (start << 32) | _LOW.unpack_from(data, at)[0]
                at += _LOW.size
            out.append(Entry(start, data[at:at + length], sources[index], offset, timestamp, born))
            at += length
        return out

    def _fire_timers(self, now: float, wall: float, work: Work) -> None:
        window_queue, hold_queue, recheck, window = self._window_queue, self._hold_queue, self._recheck, self._window
        while window_queue and window_queue[0].since + window <= now:
            buffer = window_queue.popleft()
            if self._is_idle(buffer):
                if buffer.count >= MIN_SAMPLES:
                    self._ready.setdefault(buffer.key, "window")
                else:
                    hold_queue.append(buffer)  # since order is kept: the hold queue stays in deadline order
        while hold_queue and hold_queue[0].since + self.hold <= now:
            buffer = hold_queue.popleft()
            if self._is_idle(buffer):
                self._settle_small(buffer, wall, work)
        expiry = self._expiry
        while expiry and expiry[0][0] <= wall:
            until, _, buffer = heapq.heappop(expiry)
            if buffer.rest_until == until and self._buffers.get(buffer.key) is buffer:
                # Its oldest sample expired (dead-lettered; a fresher one is parked), or it rested its longest:
                # parked anew, so that the pending partition's commit moves on.
                self._wake(buffer)
                self._settle_small(buffer, wall, work, may_rest=False)
        while recheck and recheck[0][0] <= now:
            buffer = heapq.heappop(recheck)[2]
            if not self._is_idle(buffer):
                continue
            if buffer.count >= MIN_SAMPLES and now >= buffer.since + window:
                self._ready.setdefault(buffer.key, "window")
            elif buffer.count < MIN_SAMPLES and now >= buffer.since + max(window, self.hold):
                self._settle_small(buffer, wall, work)
            else:
                self._look_again(buffer, now)

    def _is_idle(self, buffer: _Buffer) -> bool:
        """Still the key's live buffer, not resting (its expiry looks at it then), and not waiting for a batch of
        its key (done() looks at it then)."""
        return (self._buffers.get(buffer.key) is buffer and buffer.key not in self._in_flight
                and not buffer.rest_until)

    def _settle_small(self, buffer: _Buffer, wall: float, work: Work, may_rest: bool = True) -> None:
        """A buffer whose hold is over: sendable after all, empty, resting, or handed out to be parked or
        expired."""
        if buffer.count >= MIN_SAMPLES:
            self._ready.setdefault(buffer.key, "window")
        elif not buffer.count:
            del self._buffers[buffer.key]
        elif may_rest and (oldest := self._restable_birth(buffer, wall)) is not None:
            self._rest(buffer, oldest, wall, work)
        else:
            small = self._remove(buffer.key, buffer)
            oldest = wall - self.max_age
            if all(e.born > oldest for e in small.entries):
                work.park.append(small)
            elif all(e.born <= oldest for e in small.entries):
                work.expire.append(small)
            else:  # a fresh sample joined an old tail: each goes its own way
                work.expire.append(_small([e for e in small.entries if e.born <= oldest], small))
                work.park.append(_small([e for e in small.entries if e.born > oldest], small))

    def _look_again(self, buffer: _Buffer, now: float, when: float | None = None) -> None:
        """Have a buffer looked at again at `when`, by default its next deadline (the window, else the hold)."""
        if when is None:
            window = self._window
            if buffer.count >= MIN_SAMPLES or now < buffer.since + window:
                when = buffer.since + window
            else:
                when = buffer.since + max(window, self.hold)
        self._rechecks += 1
        heapq.heappush(self._recheck, (when, self._rechecks, buffer))

    # -- resting tails --------------------------------------------------------------------------------

    def _restable_birth(self, buffer: _Buffer, wall: float) -> float | None:
        """The birth of its oldest sample when the tail may rest: every sample came back from the pending topic,
        none expired yet, no copy set aside (a copy may come from the input, whose offset must not wait beyond
        the hold). None when it may not."""
        if not self.max_resting or buffer.count > self.max_resting or buffer.key in self._twins:
            return None
        if buffer.source != _MIXED and buffer.source not in self._restable:
            return None
        entries = self._unpack(buffer)  # 1-2 samples
        if buffer.source == _MIXED and any(self._index_of[e.source] not in self._restable for e in entries):
            return None
        oldest = min(e.born for e in entries)
        return oldest if oldest > wall - self.max_age else None

    def _rest(self, buffer: _Buffer, oldest: float, wall: float, work: Work) -> None:
        """Keep a tail in memory, its pending offsets unacknowledged, until it is joined, expires or is taken;
        the tails resting longest are parked first to make room."""
        while self._resting_samples + buffer.count > self.max_resting:
            key, longest = next(iter(self._resting.items()))
            work.park.append(self._remove(key, longest))
        buffer.rest_until = min(oldest + self.max_age, wall + MAX_REST_SECONDS)
        self._resting[buffer.key] = buffer
        self._resting_samples += buffer.count
        self._rechecks += 1
        heapq.heappush(self._expiry, (buffer.rest_until, self._rechecks, buffer))
        if len(self._expiry) > 2 * len(self._resting) + 1024:  # entries of tails no longer resting: rebuilt
            self._expiry = [(b.rest_until, i, b) for i, b in enumerate(self._resting.values())]
            heapq.heapify(self._expiry)

    def _wake(self, buffer: _Buffer) -> None:
        """A resting tail leaves the resting set (joined, expiring, taken or cut by a revoke)."""
        del self._resting[buffer.key]
        self._resting_samples -= buffer.count
        buffer.rest_until = 0.0

    def _take_batch(self, key: Key, reason: str, work: Work) -> Batch | None:
        buffer = self._buffers.get(key)
        if buffer is None or key in self._in_flight or buffer.count < MIN_SAMPLES:
            return None
        entries = self._unpack(buffer)
        starts = [e.start for e in entries]
        in_order = starts == sorted(starts)  # the common case: a device's samples arrive in order
        if not in_order:
            entries.sort(key=_by_start)
        entries, twins = split_twins(entries)
        if twins:  # set aside (still counted as buffered) until their original leaves
            in_order = False
            self._twins.setdefault(key, []).extend(twins)
            if len(entries) < MIN_SAMPLES:  # only copies made it look big enough
                self._repack(buffer, entries)
                if self._flush_reason is not None:  # shutting down: no more samples will come; parked
                    work.park.append(self._remove(key, buffer))
                else:  # it waits for more
                    self._look_again(buffer, buffer.since)
                return None
        take = plan_take(len(entries), self.max_samples)
        if take == len(entries):
            batch = entries
            del self._buffers[key]
            # Emptied even so: it may wait in a deadline queue for a while, holding nothing meanwhile.
            self._repack(buffer, [])
        else:
            batch = entries[:take]
            if in_order:  # what is left is the packed tail as it is: cut, not packed again
                del buffer[:sum(len(e.body) for e in batch) + _packed_heads(batch)]
                buffer.count = len(entries) - take  # its source stays as it was: at worst "mixed" too widely
            else:
                self._repack(buffer, entries[take:])
        self._in_flight.add(key)
        twins = self._twins_of(key, batch, everything=take == len(entries))
        self._samples -= take + len(twins)
        return Batch(key, batch, reason, twins)

    def _twins_of(self, key: Key, entries: list[Entry], everything: bool) -> Twins:
        """The waiting copies whose original is among `entries` (all of the key's, when `everything`), paired
        with the original's entry in `entries`: an original left in its buffer was packed again, so the one
        a copy was set aside with is another object now (equal start and bytes: one of a kind in a batch)."""
        waiting = self._twins.get(key)
        if not waiting:
            return []
        by_sample = {(e.start, e.body): e for e in entries}
        going = [(by_sample.get((o.start, o.body), o), c) for o, c in waiting
                 if everything or (o.start, o.body) in by_sample]
        if everything:
            del self._twins[key]
        elif going:
            self._twins[key] = [t for t in waiting if (t[0].start, t[0].body) not in by_sample]
        return going

    def _remove(self, key: Key, buffer: _Buffer) -> Small:
        if buffer.rest_until:
            self._wake(buffer)
        del self._buffers[key]
        self._ready.pop(key, None)
        entries, twins = split_twins(sorted(self._unpack(buffer), key=_by_start))
        self._repack(buffer, [])  # see _take_batch: the buffer may still sit in a deadline queue
        twins += self._twins_of(key, entries, everything=True)
        self._samples -= len(entries) + len(twins)
        return Small(key, entries, twins)


def _packed_heads(entries: list[Entry]) -> int:
    """Bytes the headers of these entries take packed (a start beyond int64 takes 4 more)."""
    wide = sum(1 for e in entries if not -(2**63) <= e.start < 2**63)
    return len(entries) * _HEAD.size + wide * _LOW.size


def _small(entries: list[Entry], like: Small) -> Small:
    ids = {id(e) for e in entries}
    return Small(like.key, entries, [t for t in like.twins if id(t[0]) in ids])


def split_twins(entries: list[Entry]) -> tuple[list[Entry], Twins]:
    """Entries sorted by start -> (entries without byte-identical copies, the copies with their original).

    Copies share a start, so only runs of equal starts are compared; the common case (no equal starts)
    costs one pass of float comparisons.
    """
    for i in range(1, len(entries)):
        if entries[i].start == entries[i - 1].start:
            break
    else:
        return entries, []
    unique: list[Entry] = []
    twins: Twins = []
    seen: dict[tuple[float, bytes], Entry] = {}
    for entry in entries:
        original = seen.get((entry.start, entry.body))
        if original is None:
            seen[(entry.start, entry.body)] = entry
            unique.append(entry)
        else:
            twins.append((original, entry))
    return unique, twins
