"""In-memory stand-ins for Kafka (topics, a consumer group, commits, a producer) and for the Samples API, with
the methods the Pipeline calls, plus an event loop on virtual time, so that tests drive the real Pipeline
(its run loop, batcher, delivery, settle, park, expire, dead-letter, revoke and commit logic) fast and
deterministically.

- `VirtualTimeLoop`: an asyncio loop whose `time()` is virtual. When no callback is ready it jumps to the next
  timer instead of waiting, so `asyncio.sleep`, `asyncio.wait(timeout=...)` and `wait_for` cost no real time,
  and a run is reproducible (the same inputs give the same interleaving).
- `FakeKafka`: partitions as lists of records (offsets may have gaps), committed offsets, and a consumer group with
  the eager protocol aiokafka uses: on a rebalance every member's revoke callback runs (the group waits for all
  of them), then partitions are assigned and each new owner reads from the committed offset. Partitions are
  assigned by NUMBER, like the service's co-partitioning assignor (stream/assignor.py): every topic's partition N
  goes to one member, so the member that holds input partition N also holds pending partition N (and the state of
  ledger partition N); or, with `copartitioned=False`, topic by topic as aiokafka's default round-robin assignor
  does, which may split them. Commits carry the member's generation: one that lands after the generation moved on
  is refused.
- `FakeSource` (one consumer), `FakeWriter` (the producer of dead letters, parked and ledger records: a write
  is appended to its topic, then acknowledged, each after a scripted delay) and `FakeSink` (the HTTP client, in
  front of `FakeApi`, which answers from a script and records what it accepted and refused, and when it deleted
  a user's data: `FakeApi.forget`, what goes with `stream ledger forget`).

Everything here is observable (`FakeKafka.logs`, `.committed`, `.writes`, `FakeSource.tenure_ends`,
`FakeApi.requests` with what each accepted and what its answer told the client, ...) for the test's checks.
"""

from __future__ import annotations

import asyncio
import bisect
import email.utils
import json
import math
import selectors
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from aiokafka.errors import KafkaError

from stream.ledger_format import fingerprint
from stream.ledger_store import Restored, Tail
from stream.offsets import TopicPartition
from stream.outcome import Accepted, Outcome, Partial, Retry, classify

# -- virtual time ----------------------------------------------------------------------------------------


class VirtualTimeExceeded(RuntimeError):
    """The example ran past its real-time budget (a livelock: tasks that never wait on a timer)."""


class _JumpingSelector:
    """Wraps the loop's selector: polls without blocking, and when nothing is ready advances virtual time by
    the timeout the loop asked to wait (the delay to its next timer)."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list:
        if time.monotonic() > self._loop.real_deadline:
            raise VirtualTimeExceeded("the example exceeded its real-time budget")
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            # Nothing ready and no timer: every task waits for something that will never happen.
            events = self._real.select(1.0)
            if not events:
                raise VirtualTimeExceeded("deadlock: no callback ready and no timer scheduled")
            return events
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 1000.0, real_budget: float = 30.0) -> None:
        super().__init__()
        self.virtual_now = start
        self.real_deadline = time.monotonic() + real_budget
        self._selector = _JumpingSelector(self._selector, self)  # type: ignore[assignment]

    def time(self) -> float:
        return self.virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock on by `seconds`, and at least onto the next timer: a timer fires only once the clock
        has reached it (`now + (when - now)` may round below `when`)."""
        self.virtual_now += seconds
        self._catch_up()

    def _catch_up(self) -> None:
        # asyncio fires timers due within its clock resolution. A real clock moves on meanwhile; this one must
        # be put onto the timer, or code that waits "until now >= deadline" (Throttle.wait_time) would find it
        # a hair short and wait again, forever, without time ever moving.
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if scheduled and not scheduled[0]._cancelled:
            when = scheduled[0]._when
            if self.virtual_now < when <= self.virtual_now + self._clock_resolution + 1e-9:  # type: ignore[attr-defined]
                self.virtual_now = when

    def _run_once(self) -> None:
        self._catch_up()
        super()._run_once()  # type: ignore[misc]


# -- scripts ------------------------------------------------------------------------------------------------


class Cycle:
    """Scripted values handed out in turn, over and over; `default` when the script is empty or overridden."""

    def __init__(self, items: Iterable[Any], default: Any) -> None:
        self.items = list(items)
        self.default = default
        self.used = 0
        self.override: Any = None  # when set, handed out instead of the script (a healed world)

    def next(self) -> Any:
        if self.override is not None:
            return self.override
        if not self.items:
            return self.default
        item = self.items[self.used % len(self.items)]
        self.used += 1
        return item


# -- Kafka --------------------------------------------------------------------------------------------------


@dataclass
class FakeRecord:
    """Shaped like aiokafka's ConsumerRecord where the pipeline looks (offset, value, timestamp in ms, headers)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: list[tuple[str, bytes]]
    meta: Any = None  # what the test knows about it (never read by the pipeline)

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class CommitFault:
    fail: bool = False  # the commit is refused (the coordinator is away, a rebalance is in progress, ...)
    delay: float = 0.0  # seconds before it reaches the coordinator (the generation is checked then)


class FakeKafka:
    def __init__(
        self,
        partitions: dict[str, int],
        wall: Callable[[], float],
        commit_faults: Iterable[CommitFault] = (),
        on_commit: Callable[[str, dict[TopicPartition, int]], None] | None = None,
        rebalance_timeout: float = 60.0,
        copartitioned: bool = True,
    ) -> None:
        self.partitions = dict(partitions)
        self.copartitioned = copartitioned
        self.wall = wall
        self.logs: dict[TopicPartition, list[FakeRecord]] = {
            TopicPartition(t, p): [] for t, n in partitions.items() for p in range(n)
        }
        self.next_offset: dict[TopicPartition, int] = dict.fromkeys(self.logs, 0)
        self.committed: dict[TopicPartition, int] = {}
        self.commit_faults = Cycle(commit_faults, CommitFault())
        self.on_commit = on_commit
        self.rebalance_timeout = rebalance_timeout
        self.members: list[FakeSource] = []
        self.generation = 0
        self.rebalances = 0
        self.errors: list[str] = []  # what the group saw go wrong in a member (exceptions in callbacks, ...)
        self.trace: list[str] = []
        self.writes: list[Write] = []  # every producer write of every member, with when it landed and was acked
        self.split_rebalances = 0  # rebalances that gave one partition number's topics to different members
        self._lock = asyncio.Lock()
        self._settled = asyncio.Event()
        self._settled.set()
        self._round_robin = 0

    # -- topics ---------------------------------------------------------------------------------------------

    def tps(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in range(self.partitions[topic])]

    def append(
        self, topic: str, partition: int | None, key: bytes | None, value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None, gap: int = 0, meta: Any = None,
    ) -> FakeRecord:
        if partition is None:
            if key is not None:
                partition = zlib.crc32(key) % self.partitions[topic]
            else:
                partition = self._round_robin % self.partitions[topic]
                self._round_robin += 1
        tp = TopicPartition(topic, partition)
        offset = self.next_offset[tp] + gap  # a gap: compaction or a transaction marker took offsets
        record = FakeRecord(topic, partition, offset, key, value, int(self.wall() * 1000), list(headers or []), meta)
        self.logs[tp].append(record)
        self.next_offset[tp] = offset + 1
        return record

    def read(self, tp: TopicPartition, position: int, limit: int) -> list[FakeRecord]:
        log = self.logs[tp]  # in offset order: found by bisection (a test may append 100,000 records)
        at = bisect.bisect_left(log, position, key=_offset_of)
        return log[at:at + limit]

    def end_offset(self, tp: TopicPartition) -> int:
        return self.next_offset[tp]

    # -- the group ------------------------------------------------------------------------------------------

    async def settled(self) -> None:
        await self._settled.wait()

    def join(self, member: FakeSource) -> None:
        if member not in self.members:
            self.members.append(member)

    def leave(self, member: FakeSource) -> None:
        if member in self.members:
            self.members.remove(member)

    async def rebalance(self, plan: list[int] | None = None) -> None:
        """Eager protocol: every member revokes all it holds (the group waits for each, up to the rebalance
        timeout), then every partition of every subscribed topic gets an owner; owners read from the committed
        offset. Co-partitioned: partition N of every topic goes to `plan[N]` (default: member N, round robin).
        Otherwise `plan[i]` picks the owner of the i-th of all topics' partitions in order (default: round
        robin over them, like aiokafka's default assignor): partition N of two topics may go to two members."""
        async with self._lock:
            self.rebalances += 1
            self._settled.clear()
            try:
                members = list(self.members)
                self.trace.append(f"{self.wall():.2f} rebalance {self.rebalances}: revoke {[m.name for m in members]}")
                await asyncio.gather(*(m._revoke() for m in members))
                self.generation += 1
                members = [m for m in self.members if not m.dead]
                if not members:
                    return
                tps = sorted({tp for m in members for t in m.topics for tp in self.tps(t)})
                owners: dict[FakeSource, list[TopicPartition]] = {m: [] for m in members}
                holders: dict[int, set[FakeSource]] = {}
                for i, tp in enumerate(tps):
                    unit = tp.partition if self.copartitioned else i
                    pick = plan[unit % len(plan)] if plan else unit
                    owner = members[pick % len(members)]
                    owners[owner].append(tp)
                    holders.setdefault(tp.partition, set()).add(owner)
                if any(len(h) > 1 for h in holders.values()):
                    self.split_rebalances += 1
                    self.trace.append(f"{self.wall():.2f} (not co-partitioned)")
                for member, assigned in owners.items():
                    member.generation = self.generation
                    member.assignment = set(assigned)
                    member.positions = {tp: self.committed.get(tp, 0) for tp in assigned}
                    self.trace.append(f"{self.wall():.2f} assign {member.name}: {_names(assigned)}")
                await asyncio.gather(*(m._assign(owners[m]) for m in members))
            finally:
                self._settled.set()

    async def commit(self, member: FakeSource, offsets: dict[TopicPartition, int]) -> bool:
        fault = self.commit_faults.next()
        generation = member.generation
        # Checked when the member sends it: once sent, a commit may land after the member's revoke callback
        # returned (Kafka takes it while the generation has not moved on).
        stray = [tp for tp in offsets if tp not in member.assignment]
        if stray:
            self.errors.append(f"{self.wall():.2f} {member.name} committed partitions it does not hold: "
                               f"{_names(stray)}")
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.fail or member.dead or generation != self.generation or member not in self.members:
            self.trace.append(f"{self.wall():.2f} commit refused {member.name} {_offsets(offsets)}")
            return False
        self.committed.update(offsets)
        self.trace.append(f"{self.wall():.2f} commit {member.name} {_offsets(offsets)}")
        if self.on_commit is not None:
            self.on_commit(member.name, offsets)
        return True


class FakeSource:
    """One consumer of the group (the Pipeline's `source`)."""

    def __init__(
        self, kafka: FakeKafka, name: str, topics: Iterable[str], max_records: int = 5, slow: float = 0.0,
        fail_every: int = 0,
    ) -> None:
        self.kafka = kafka
        self.name = name
        self.topics = tuple(topics)
        self.max_records = max_records
        # Seconds a fetch waits before it takes records (a slow broker): longer than the pipeline's tick, the
        # fetch task is still running while the loop goes on (to a commit, say), and may finish meanwhile.
        self.slow = slow
        self.fail_every = fail_every  # every n-th fetch raises a KafkaError (0: never)
        self.fetches = 0
        self.assignment: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.generation = -1
        self.paused = False
        self.held: set[TopicPartition] = set()  # held back while their ledger restores
        self.dead = False
        self.started = asyncio.Event()
        self.stopped = False
        # When (wall time) and how its hold on its partitions ended: "revoke" (its revoke callback returned),
        # "crash", "stop" (left the group). The next owner of a partition number is assigned only after one.
        self.tenure_ends: list[tuple[float, str]] = []
        self._on_assigned: Callable[[list[TopicPartition]], Awaitable[None]] | None = None
        self._on_revoked: Callable[[list[TopicPartition]], Awaitable[None]] | None = None
        self._callbacks: set[asyncio.Task] = set()

    def bind(self, on_assigned, on_revoked) -> None:
        self._on_assigned, self._on_revoked = on_assigned, on_revoked

    async def start(self) -> None:
        self.kafka.join(self)
        self.started.set()

    async def stop(self) -> None:
        """Leave the group (aiokafka calls no revoke callback on close)."""
        self.stopped = True
        self.tenure_ends.append((self.kafka.wall(), "stop"))
        self.kafka.leave(self)

    def crash(self) -> None:
        """The process is gone: nothing of it reaches Kafka any more."""
        self.dead = True
        self.tenure_ends.append((self.kafka.wall(), "crash"))
        for task in list(self._callbacks):
            task.cancel()

    async def fetch(self, timeout: float) -> dict[TopicPartition, list[FakeRecord]]:
        if self.dead:
            await asyncio.get_running_loop().create_future()  # never answers
        await self.kafka.settled()  # getmany waits while the group rebalances
        self.fetches += 1
        if self.fail_every and self.fetches % self.fail_every == 0:
            await asyncio.sleep(timeout)
            raise KafkaError("a corrupt batch, say")
        if self.slow:
            await asyncio.sleep(self.slow)
            await self.kafka.settled()
        out = self._take()
        if not out:
            await asyncio.sleep(timeout)
            await self.kafka.settled()
            out = self._take()
        await asyncio.sleep(0)
        return out

    def rewind(self) -> None:
        """The client goes back to the committed offsets without a rebalance: records come again within
        one assignment."""
        for tp in self.positions:
            self.positions[tp] = self.kafka.committed.get(tp, 0)

    def _take(self) -> dict[TopicPartition, list[FakeRecord]]:
        out: dict[TopicPartition, list[FakeRecord]] = {}
        if self.paused or self.dead or self.stopped:
            return out
        for tp in sorted(self.assignment - self.held):
            records = self.kafka.read(tp, self.positions[tp], self.max_records)
            if records:
                self.positions[tp] = records[-1].offset + 1
                out[tp] = records
        return out

    async def commit(self, offsets: dict[TopicPartition, int], timeout: float = 10.0) -> bool:
        if not offsets:
            return True
        if self.dead:
            return False
        return await self.kafka.commit(self, offsets)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def hold(self, tps: list[TopicPartition]) -> None:
        self.held.update(tps)

    def release(self, tps: list[TopicPartition]) -> None:
        self.held.difference_update(tps)

    def forget(self, tps: list[TopicPartition]) -> None:
        self.held.difference_update(tps)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.kafka.end_offset(tp)

    def connected(self) -> bool:
        return not self.dead

    async def _revoke(self) -> None:
        revoked = sorted(self.assignment)
        if self._on_revoked is not None and not self.dead and not self.stopped:
            await self._callback(self._on_revoked(revoked), f"revoke {_names(revoked)}")
        if revoked:
            self.tenure_ends.append((self.kafka.wall(), "revoke"))
        self.assignment = set()
        self.positions = {}

    async def _assign(self, assigned: list[TopicPartition]) -> None:
        if self._on_assigned is not None and not self.dead and not self.stopped:
            await self._callback(self._on_assigned(assigned), f"assign {_names(assigned)}")

    async def _callback(self, coroutine: Awaitable[None], what: str) -> None:
        task = asyncio.ensure_future(coroutine)
        self._callbacks.add(task)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.kafka.rebalance_timeout)
        except TimeoutError:
            self.kafka.errors.append(f"{self.kafka.wall():.2f} {self.name}: {what} took longer than the rebalance "
                                     "timeout")
            task.cancel()
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        except Exception as exc:  # aiokafka would log and swallow it; here it is a finding
            self.kafka.errors.append(f"{self.kafka.wall():.2f} {self.name}: {what} raised {exc!r}")
        finally:
            self._callbacks.discard(task)


@dataclass(frozen=True)
class WriteDelay:
    append: float = 0.0  # seconds until the record is in its topic
    ack: float = 0.0  # further seconds until the producer hears Kafka's acknowledgement


@dataclass
class Write:
    """One record handed to a FakeWriter, and what became of it (wall times; None: never)."""

    member: str
    topic: str
    partition: int | None  # as asked (None: the key's hash)
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    written: float  # when the pipeline handed it to the producer
    landed: float | None = None  # when it was appended to its topic (readable by anyone from then on)
    acked: float | None = None  # when the pipeline was told Kafka has it
    record: FakeRecord | None = None


class FakeWriter:
    """The pipeline's KafkaWriter: each write lands in its topic, then is acknowledged, after scripted delays."""

    STOP_FLUSH_SECONDS = 5.0  # like KafkaWriter.stop: flush for a while, abandon what is left

    def __init__(self, kafka: FakeKafka, name: str, delays: Cycle,
                 topic_delays: dict[str, Cycle] | None = None) -> None:
        self.kafka = kafka
        self.name = name
        self.delays = delays
        self.topic_delays = topic_delays or {}  # a topic's own script of delays (when not empty)
        self.dead = False
        self.stopped = False
        self.writes = 0
        self._pending: dict[asyncio.Task, Write] = {}  # not in Kafka yet

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True
        if self._pending and not self.dead:
            await asyncio.wait(set(self._pending), timeout=self.STOP_FLUSH_SECONDS)
        for task in list(self._pending):
            task.cancel()

    def crash(self, land: bool) -> None:
        """The process is gone. Writes not yet in Kafka land anyway (`land`: the request was on the wire) or
        never; no acknowledgement reaches anyone."""
        self.dead = True
        for task, write in list(self._pending.items()):
            task.cancel()
            if land:
                self._append(write)
        self._pending.clear()

    def write(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
              partition: int | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        self.writes += 1
        write = Write(self.name, topic, partition, key, value, list(headers), self.kafka.wall())
        self.kafka.writes.append(write)
        script = self.topic_delays.get(topic)
        delays = script if script is not None and (script.items or script.override is not None) else self.delays
        task = loop.create_task(self._write(write, delays.next(), done))
        self._pending[task] = write
        return done

    async def _write(self, write: Write, delay: WriteDelay, done: asyncio.Future) -> None:
        await asyncio.sleep(delay.append)
        if self.dead:
            return
        record = self._append(write)
        self._pending.pop(asyncio.current_task(), None)  # in Kafka now: a crash cannot undo it
        await asyncio.sleep(delay.ack)
        if not self.dead and not done.done():
            write.acked = self.kafka.wall()
            done.set_result(record.offset)

    def _append(self, write: Write) -> FakeRecord:
        record = self.kafka.append(write.topic, write.partition, write.key, write.value, list(write.headers))
        write.landed, write.record = self.kafka.wall(), record
        return record


class FakeLedgerStore:
    """The ledger topic in a FakeKafka: what was written to a partition, the latest value per key."""

    def __init__(self, kafka: FakeKafka, topic: str) -> None:
        self.kafka = kafka
        self.topic = topic
        self.reads = 0  # whole partitions read (restores)
        self.tail_reads = 0  # reads from an offset on (catch-ups, follows)

    async def ensure(self) -> int:
        return self.kafka.partitions[self.topic]

    async def read(self, partition: int) -> Restored:
        tp = TopicPartition(self.topic, partition)
        end = self.kafka.next_offset[tp]
        latest: dict[bytes | None, bytes] = {}
        for record in self.kafka.logs[tp]:
            if record.value is None:
                latest.pop(record.key, None)
            else:
                latest[record.key] = record.value
        self.reads += 1
        await asyncio.sleep(0.01)  # a read takes some time: records may be fetched for other partitions meanwhile
        return Restored(list(latest.values()), len(self.kafka.logs[tp]), 0.01, end)

    async def read_since(self, partition: int, start: int) -> Tail:
        tp = TopicPartition(self.topic, partition)
        end = self.kafka.next_offset[tp]
        records = [(r.offset, r.key, r.value) for r in self.kafka.logs[tp] if start <= r.offset < end]
        self.tail_reads += 1
        await asyncio.sleep(0.01)
        return Tail(records, end, start)

    async def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        return {p: self.kafka.next_offset[TopicPartition(self.topic, p)] for p in partitions}

    async def close(self) -> None:
        pass


# -- the Samples API ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """How the API answers one request.

    `status` None: no HTTP answer (`error`: "timeout" or a connection error); with `processed` the API took the
    batch anyway (the answer was lost). For 207, `refused` (indices, taken modulo the batch size) are the
    samples the API refused; `readable` says whether the body lists them readably (index written as `forms`:
    0 int, 1 digit string, 2 integral float), `noise` adds entries that name no sample of the batch, and an
    unreadable body is `UNREADABLE_207[unreadable]`.
    """

    status: int | None = 200
    latency: float = 0.0
    retry_after: str | None = None  # a header value, or "date+N": an HTTP date N seconds ahead
    refused: tuple[int, ...] = ()
    readable: bool = True
    forms: tuple[int, ...] = (0,)
    noise: tuple[int, ...] = ()
    unreadable: int = 0
    processed: bool = False
    error: str = "timeout"


def _noise(kind: int, n: int) -> Any:
    return [
        {"index": n + 2, "reason": "beyond the batch"},
        {"index": -1, "reason": "negative"},
        {"index": 1.5},
        {"index": True},
        {"reason": "no index"},
        "not an object",
        {"index": "x1"},
        {"index": "\u00b2"},
    ][kind % 8]


def _unreadable(kind: int, n: int) -> bytes:
    return [
        b"",
        b"<html>busy</html>",
        b'{"rejected": []}',
        b'{"rejected": "all"}',
        b'[{"index": 0}]',
        json.dumps({"rejected": [{"index": n + 1, "reason": "only beyond the batch"}]}).encode(),
        b'{"accepted": 2}',
        b'{"rejected": null}',
    ][kind % 8]


UNREADABLE_207 = 8
NOISE_KINDS = 8

Norm = tuple  # a sample's identity, comparable across its encodings (see `norm`)


def _when(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    offset = moment.utcoffset()
    return moment.timestamp(), offset.total_seconds() if offset is not None else float("nan")


def norm(user_id: str, data_type: str, sample: dict) -> Norm:
    """What makes a sample the same sample, whatever the JSON spelling of its dates (".000", "Z", "+00:00")."""
    value = sample["value"]
    return (
        user_id, data_type, sample["device_name"], _when(sample["start_date"]), _when(sample.get("end_date")),
        sample["unit"], type(value).__name__, value, sample.get("device_version"),
    )


SAMPLE_FIELDS = frozenset({"device_name", "device_version", "start_date", "end_date", "unit", "value"})


class _RawBatch(msgspec.Struct):
    user_id: str
    data_type: str
    data: list[msgspec.Raw]


@dataclass
class Request:
    member: str
    at: float
    user_id: str
    data_type: str
    samples: list[dict]
    norms: list[Norm]
    prints: list[int] = field(default_factory=list)  # the ledger's fingerprint of each sample's exact bytes
    reply: Reply | None = None
    accepted: frozenset[int] = frozenset()  # indices of the samples the API took (whatever it answered)
    # What the answer told the client, once it reached it (`answered`): the indices it can read as accepted
    # (a 2xx: all; a 207 whose list of refusals is readable: the others; anything else: none).
    answered: float | None = None
    told: frozenset[int] = frozenset()
    cancelled: float | None = None  # the client gave up waiting for the answer (its task was cancelled)
    lost_in_crash: bool = False  # the client died before the answer came


def told_accepted(outcome: Outcome, n: int) -> frozenset[int]:
    """The samples of a batch of `n` that an answer says, readably, the API accepted."""
    if isinstance(outcome, Accepted):
        return frozenset(range(n))
    if isinstance(outcome, Partial) and outcome.refused:
        listed = {i for i in outcome.refused if 0 <= i < n}
        if listed:
            return frozenset(range(n)) - listed
    return frozenset()


@dataclass
class FakeApi:
    replies: Cycle
    wall: Callable[[], float]
    poison_users: frozenset[str] = frozenset()  # their batches always fail with a 500 (until healed)
    api_timeout: float = 30.0
    healthy: bool = False  # healed: every request accepted at once
    requests: list[Request] = field(default_factory=list)
    accepted: set[Norm] = field(default_factory=set)
    accepted_count: int = 0
    refused: set[Norm] = field(default_factory=set)  # refused by a 400/413/422 or listed in a 207
    answered_207: set[Norm] = field(default_factory=set)  # in a batch answered 207 (whatever its body)
    malformed: list[str] = field(default_factory=list)  # requests the real API would refuse as malformed
    # The user data the API deleted (what `stream ledger forget` goes with): (wall time, user id, data type or
    # None for all). `accepted` stays what it ever accepted (delivered is delivered); `forgotten_at` says which
    # acceptances of a sample still count as "the API has it".
    forgotten: list[tuple[float, str, str | None]] = field(default_factory=list)

    def forget(self, user_id: str, data_type: str | None = None) -> None:
        """The API deletes what it holds of a user (of one data type, or all): from now on those samples are new
        to it again. Its history (`requests`, `accepted`) is kept for the checks."""
        self.forgotten.append((self.wall(), user_id, data_type))

    def forgotten_at(self, sample: Norm) -> float:
        """When the API last deleted a sample's data (-inf: never): acceptances before it no longer count."""
        return max((at for at, user_id, data_type in self.forgotten
                    if user_id == sample[0] and data_type in (None, sample[1])), default=-math.inf)

    def handle(self, member: str, body: bytes) -> tuple[Reply, int | None, dict[str, str], bytes]:
        """Process one request: record what the API accepts, and say how it answers."""
        parsed = json.loads(body)
        user_id, data_type, samples = parsed["user_id"], parsed["data_type"], parsed["data"]
        norms = [norm(user_id, data_type, s) for s in samples]
        raw = msgspec.json.decode(body, type=_RawBatch)  # each sample's bytes as sent, as the ledger hashes them
        request = Request(member, self.wall(), user_id, data_type, samples, norms,
                          [fingerprint(bytes(r)) for r in raw.data])
        self.requests.append(request)
        n = len(samples)
        for s in samples:
            if not set(s) <= SAMPLE_FIELDS:
                self.malformed.append(f"unknown fields forwarded: {sorted(set(s) - SAMPLE_FIELDS)}")
        if self.healthy:
            reply = Reply(200, latency=0.01)
        elif user_id in self.poison_users:
            reply = Reply(500, latency=0.01)
        else:
            reply = self.replies.next()
        request.reply = reply
        status = reply.status
        headers: dict[str, str] = {}
        if reply.retry_after is not None:
            if reply.retry_after.startswith("date+"):
                ahead = float(reply.retry_after[5:])
                headers["Retry-After"] = email.utils.formatdate(self.wall() + ahead, usegmt=True)
            else:
                headers["Retry-After"] = reply.retry_after
        if status is not None and 300 <= status < 400:
            headers["Location"] = "https://elsewhere.example/samples"
        payload = b""
        accepted: set[int] = set()
        if status is None:
            if reply.processed:
                accepted = set(range(n))
        elif status == 207:
            refused = {i % n for i in reply.refused}
            accepted = set(range(n)) - refused
            self.refused.update(norms[i] for i in refused)
            self.answered_207.update(norms)
            if reply.readable:
                entries: list[Any] = []
                for j, i in enumerate(sorted(refused)):
                    form = reply.forms[j % len(reply.forms)] if reply.forms else 0
                    index: Any = [i, str(i), float(i)][form % 3]
                    entries.append({"index": index, "reason": f"refused sample {i}"})
                for k, kind in enumerate(reply.noise):
                    entries.insert(k % (len(entries) + 1), _noise(kind, n))
                payload = json.dumps({"accepted": len(accepted), "rejected": entries}).encode()
            else:
                payload = _unreadable(reply.unreadable, n)
        elif 200 <= status < 300:
            accepted = set(range(n))
            payload = json.dumps({"accepted": n}).encode()
        elif status in (400, 413, 422):
            self.refused.update(norms)
            payload = b'{"error": "refused"}'
        request.accepted = frozenset(accepted)
        for i in sorted(accepted):
            self.accepted.add(norms[i])
            self.accepted_count += 1
        return reply, status, headers, payload


class FakeSink:
    """The pipeline's SamplesSink in front of a FakeApi. The API processes a request when it arrives; the answer
    comes back after the reply's latency (or `api_timeout`, for a timeout), unless the client died meanwhile."""

    def __init__(self, api: FakeApi, name: str) -> None:
        self.api = api
        self.name = name
        self.dead = False
        self.closed = False

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    async def send(self, body: bytes) -> tuple[int | None, Outcome]:
        if self.dead:
            await asyncio.get_running_loop().create_future()
        reply, status, headers, payload = self.api.handle(self.name, body)
        request = self.api.requests[-1]
        try:
            await asyncio.sleep(self.api.api_timeout if status is None and reply.error == "timeout"
                                else reply.latency)
            if self.dead:
                await asyncio.get_running_loop().create_future()  # the answer never reaches a dead process
        except asyncio.CancelledError:
            if self.dead:
                request.lost_in_crash = True
            else:
                request.cancelled = self.api.wall()
            raise
        outcome = Retry(reply.error) if status is None else classify(status, headers, payload, self.api.wall())
        request.answered = self.api.wall()
        request.told = told_accepted(outcome, len(request.norms))
        return status, outcome


def _offset_of(record: FakeRecord) -> int:
    return record.offset


def _names(tps: Iterable[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}-{tp.partition}" for tp in sorted(tps))


def _offsets(offsets: dict[TopicPartition, int]) -> str:
    return ",".join(f"{tp.topic}-{tp.partition}@{o}" for tp, o in sorted(offsets.items()))
