"""The co-partitioned assignor in a real consumer group: one member holds partition N of the input and the
pending topic (so one member owns ledger partition N), members keep their numbers when others leave or join,
and what happens while members of the older version (round robin only) are still in the group."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaError

from stream.assignor import NO_CLAIM, CoPartitionedAssignor, assignment_strategy

from .conftest import Topics, eventually

pytestmark = pytest.mark.integration

PARTITIONS = 4  # the `topics` fixture creates each topic with 4 partitions
# Seconds. A rebalance here takes about one heartbeat interval, but the first tests of a session meet a broker
# still loading its group coordinator (and CI runs on 2 busy cores).
WAIT = 60.0
OLDER_VERSION = (RoundRobinPartitionAssignor,)  # what the releases before this assignor use: aiokafka's default


class GroupMember:
    """One consumer of the group, polled continuously (as the service's loop does) so it heartbeats and rejoins."""

    def __init__(self, kafka: str, topics: Topics, strategy: Sequence[object]) -> None:
        self.topics = [topics.samples, topics.pending]
        self.assignor = next((s for s in strategy if isinstance(s, CoPartitionedAssignor)), None)
        self.errors: list[str] = []  # what getmany raised, by class name
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka,
            group_id=topics.group,
            partition_assignment_strategy=tuple(strategy),
            enable_auto_commit=False,
            # A member that joins or leaves is noticed by the others at their next heartbeat: keep it short.
            session_timeout_ms=6000,  # the broker's minimum
            heartbeat_interval_ms=200,
            rebalance_timeout_ms=10000,
        )
        self._polling: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> GroupMember:
        await self.consumer.start()
        self.consumer.subscribe(self.topics)
        self._polling = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            try:
                await self.consumer.getmany(timeout_ms=100)
            except KafkaError as exc:  # as the service does: note it, try again shortly
                self.errors.append(type(exc).__name__)
                await asyncio.sleep(0.1)  # paces the retries; nothing waits on it

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._polling is not None:
            self._polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._polling
        await self.consumer.stop()  # leaves the group: the others rebalance at once

    def assigned(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def numbers(self) -> dict[str, set[int]]:
        """Partition numbers held, per topic."""
        return {t: {tp.partition for tp in self.assigned() if tp.topic == t} for t in self.topics}


@contextlib.asynccontextmanager
async def members_of(kafka: str, topics: Topics) -> AsyncIterator[list[GroupMember]]:
    """A list of group members that the test starts; every one still running is stopped at the end."""
    await topics_led(kafka, topics)
    members: list[GroupMember] = []
    try:
        yield members
    finally:
        await asyncio.gather(*(m.stop() for m in members), return_exceptions=True)


async def topics_led(kafka: str, topics: Topics) -> None:
    """Wait until the broker's metadata lists both topics with a leader for every partition. On a broker seconds
    old (the first tests of a session), members that join before then can be given an assignment without those
    topics (the assignor skips a topic it has no metadata for, like aiokafka's own), and it was seen to stay so
    for over a minute; the service's topics exist long before it starts."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        async def led() -> bool:
            found = await admin.describe_topics([topics.samples, topics.pending])
            return all(t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"]) for t in found)

        await eventually(led, timeout=WAIT, what="both topics in the metadata with their leaders")
    finally:
        await admin.close()


async def started(members: list[GroupMember], member: GroupMember) -> GroupMember:
    members.append(member)
    return await member.start()


def every_partition(topics: Topics) -> set[TopicPartition]:
    return {TopicPartition(t, p) for t in (topics.samples, topics.pending) for p in range(PARTITIONS)}


async def settled(members: list[GroupMember], topics: Topics, after_epoch: int) -> int:
    """Wait until the members hold every partition once, all from one assignment of our protocol newer than
    `after_epoch`, each member holding some; returns that assignment's epoch."""

    async def check() -> bool:
        held = [m.assigned() for m in members]
        owned = [m.assignor.owned for m in members if m.assignor is not None]
        return (
            all(held)
            and sum(map(len, held)) == len(every_partition(topics))
            and set().union(*held) == every_partition(topics)
            and len(owned) == len(members)
            and len({o.epoch for o in owned}) == 1
            and owned[0].epoch > after_epoch
            # on_assignment ran for the assignment the consumer shows (not a snapshot of a join in progress)
            and all(o.numbers == set().union(*m.numbers().values()) for o, m in zip(owned, members, strict=True))
        )

    await eventually(check, timeout=WAIT, what="one stable assignment of every partition")
    assert all(not m.errors for m in members), [m.errors for m in members]
    return members[0].assignor.owned.epoch  # type: ignore[union-attr]


def assert_co_partitioned_and_balanced(members: list[GroupMember]) -> None:
    held = []
    for m in members:
        per_topic = list(m.numbers().values())
        assert all(ns == per_topic[0] for ns in per_topic), f"partition numbers differ across topics: {per_topic}"
        held.append(len(per_topic[0]))
    assert max(held) - min(held) <= 1, f"unbalanced: {held}"


async def test_members_hold_the_same_numbers_of_both_topics_and_keep_them_across_rebalances(
    kafka: str, topics: Topics
) -> None:
    async with members_of(kafka, topics) as members:
        for _ in range(3):
            await started(members, GroupMember(kafka, topics, assignment_strategy()))
        epoch = await settled(members, topics, after_epoch=0)
        assert_co_partitioned_and_balanced(members)
        before = {id(m): m.numbers()[topics.samples] for m in members}

        # One member leaves: its numbers go to the others, who keep all of theirs.
        leaving = max(members, key=lambda m: len(before[id(m)]))  # the one with 2 of the 4: both survivors gain
        await leaving.stop()
        members.remove(leaving)
        epoch = await settled(members, topics, after_epoch=epoch)
        assert_co_partitioned_and_balanced(members)
        for m in members:
            assert before[id(m)] <= m.numbers()[topics.samples], "a survivor lost a number it held"
        survivors = {id(m): m.numbers()[topics.samples] for m in members}
        assert sorted(map(len, survivors.values())) == [2, 2]

        # A member joins: the survivors give up only their surplus (one number in all), and only to it.
        newcomer = await started(members, GroupMember(kafka, topics, assignment_strategy()))
        await settled(members, topics, after_epoch=epoch)
        assert_co_partitioned_and_balanced(members)
        for m in members:
            if m is not newcomer:
                assert m.numbers()[topics.samples] <= survivors[id(m)], "a survivor took another's number"
        assert sorted(len(m.numbers()[topics.samples]) for m in members if m is not newcomer) == [1, 2]
        assert len(newcomer.numbers()[topics.samples]) == 1


async def test_during_an_upgrade_this_version_joins_once_the_round_robin_members_have_left(
    kafka: str, topics: Topics
) -> None:
    async with members_of(kafka, topics) as members:
        old = await started(members, GroupMember(kafka, topics, OLDER_VERSION))
        await eventually(lambda: holds(old, every_partition(topics)), timeout=WAIT, what="the old member's share")

        # Our protocol alone has nothing in common with the old member's: the coordinator refuses the join (an
        # error getmany raises, and the service logs and retries), and leaves the old member's share alone.
        new = await started(members, GroupMember(kafka, topics, assignment_strategy()))
        await eventually(lambda: refused(new), timeout=WAIT, what="the coordinator's refusal")
        assert set(new.errors) == {"InconsistentGroupProtocolError"}
        assert not new.assigned() and old.assigned() == every_partition(topics)

        await old.stop()
        # A join refused before the old member left may still report its error: only errors after it count.
        await eventually(lambda: holds(new, every_partition(topics)), timeout=WAIT, what="the new member's share")
        new.errors.clear()
        await settled([new], topics, after_epoch=0)


async def test_with_the_round_robin_fallback_the_group_uses_round_robin_until_the_last_old_member_leaves(
    kafka: str, topics: Topics
) -> None:
    """The coordinator's choice of protocol (not what ships: see `assignment_strategy` for why). One new member
    only, so aiokafka's join per listed assignor cannot make two members restart each other's rebalances."""
    async with members_of(kafka, topics) as members:
        old = await started(members, GroupMember(kafka, topics, OLDER_VERSION))
        await eventually(lambda: holds(old, every_partition(topics)), timeout=WAIT, what="the old member's share")

        new = await started(members, GroupMember(kafka, topics, assignment_strategy(round_robin_fallback=True)))

        async def shared() -> bool:
            return bool(old.assigned()) and bool(new.assigned()) and (
                old.assigned() | new.assigned() == every_partition(topics)
            )

        await eventually(shared, timeout=WAIT, what="an assignment of both members")
        assert new.assignor is not None and new.assignor.owned == NO_CLAIM  # round robin ran, ours did not

        await old.stop()
        await settled([new], topics, after_epoch=0)  # everyone left supports ours: the coordinator switches


async def holds(member: GroupMember, partitions: set[TopicPartition]) -> bool:
    return member.assigned() == partitions


async def refused(member: GroupMember) -> bool:
    return bool(member.errors)
