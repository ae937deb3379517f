"""Consumer group assignment by partition NUMBER: every subscribed topic's partition N goes to one member, and a
member keeps the numbers it had as far as balance allows.

Why: the sync ledger's partition N serves input partition N of every subscribed topic (the input topics and the
pending topic), so one member must hold all of them; and each number that moves costs a ledger restore, so only
the surplus moves. `plan` is the pure decision; `CoPartitionedAssignor` carries it through aiokafka's group
protocol: what each member owned, and as of which assignment epoch, travels in its JoinGroup user_data.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from typing import Annotated, Literal

import msgspec
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

log = logging.getLogger("stream.assignor")

PROTOCOL_NAME = "stream-copartitioned"
MAX_EPOCH = 2**63 - 1  # msgpack's signed range; an epoch never gets near it, a forged one must not crash us


# ---------------------------------------------------------------------------------------------------- the plan


class Claim(msgspec.Struct, frozen=True):
    """What a member says it owned: partition numbers, as of the assignment `epoch` that gave them to it."""

    numbers: frozenset[int] = frozenset()
    epoch: int = 0


NO_CLAIM = Claim()


class Member(msgspec.Struct, frozen=True):
    subscription: frozenset[str]
    claim: Claim = NO_CLAIM


class Plan(msgspec.Struct, frozen=True):
    numbers: dict[str, list[int]]  # member -> the partition numbers it owns (its ledger partitions)
    partitions: dict[str, dict[str, list[int]]]  # member -> topic -> partitions, what Kafka is told


def plan_numbers(numbers: Iterable[int], claims: Mapping[str, Claim]) -> dict[str, list[int]]:
    """Share the partition `numbers` among the members of `claims`: balanced, sticky, deterministic.

    - Balanced: each member gets ⌊u/n⌋ or ⌈u/n⌉ numbers (u numbers, n members).
    - Claims: a claimed number that does not exist is ignored; a number claimed by several members goes to the
      claim of the latest epoch (the others are stale: their member was away while the group moved on), then to
      the member claiming fewer (existing) numbers, then to the lowest member id.
    - Sticky: with w_m the numbers member m won above and b = ⌊u/n⌋, the u mod n quotas of b + 1 go to the
      members with the most won numbers, and each member keeps exactly min(w_m, its quota) of them (its
      lowest). So the numbers that stay put total Σ min(w_m, b) + min(u mod n, #{m : w_m > b}), the most any
      balanced plan can keep; only the surplus moves.
    - The rest (surplus, orphans, new numbers) go one by one, lowest first, to the member with the fewest so
      far that is below its quota (ties: lowest member id).

    Every member of `claims` has a key in the result; the same inputs give the same result.
    """
    units = sorted(set(numbers))
    members = sorted(claims)
    if not members:
        return {}
    exists = set(units)
    valid = {m: claims[m].numbers & exists for m in members}

    claimants: dict[int, list[str]] = defaultdict(list)
    for m in members:
        for n in valid[m]:
            claimants[n].append(m)
    won: dict[str, list[int]] = {m: [] for m in members}
    for n in sorted(claimants):
        winner = min(claimants[n], key=lambda m: (-claims[m].epoch, len(valid[m]), m))
        won[winner].append(n)

    base, extra = divmod(len(units), len(members))
    # The larger quotas go to the members that would otherwise give a number away: that is what keeps the most.
    by_holdings = sorted(members, key=lambda m: (-len(won[m]), m))
    quota = {m: base + (i < extra) for i, m in enumerate(by_holdings)}
    owned = {m: won[m][: quota[m]] for m in members}

    taken = {n for ns in owned.values() for n in ns}
    free = [n for n in units if n not in taken]
    # Σ quota = u, and nobody holds more than its quota: the free numbers fill the gaps exactly.
    wanting = [(len(owned[m]), m) for m in members if len(owned[m]) < quota[m]]
    heapq.heapify(wanting)
    for n in free:
        count, m = heapq.heappop(wanting)
        owned[m].append(n)
        if count + 1 < quota[m]:
            heapq.heappush(wanting, (count + 1, m))
    return {m: sorted(owned[m]) for m in members}


def plan(partitions: Mapping[str, Collection[int]], members: Mapping[str, Member]) -> Plan:
    """Assign every partition of `partitions` (topic -> partition ids) that some member subscribes to.

    Unit N is every (topic, N) that exists, so topics may have different partition counts. The numbers are
    shared by `plan_numbers` among the members that subscribe to at least one of the topics; (topic, N) goes
    to the owner of N. Members are meant to subscribe alike; should one not subscribe to a topic (a half-done
    deploy), its (topic, N) goes instead to the subscriber of that topic holding the fewest partitions so far
    (ties: lowest member id), so each partition of a subscribed topic is still assigned exactly once.
    A topic nobody subscribes to is not assigned.
    """
    subscribers = {t: sorted(m for m in members if t in members[m].subscription) for t in partitions}
    layout = {t: sorted(set(ids)) for t, ids in partitions.items() if subscribers[t]}
    eligible = {m: member.claim for m, member in members.items() if not member.subscription.isdisjoint(layout)}
    numbers = plan_numbers({n for ids in layout.values() for n in ids}, eligible)
    owner = {n: m for m, ns in numbers.items() for n in ns}

    assigned: dict[str, dict[str, list[int]]] = {m: defaultdict(list) for m in members}
    load: Counter[str] = Counter()
    strays: list[tuple[str, int]] = []
    for topic in sorted(layout):
        for n in layout[topic]:
            m = owner[n]
            if topic in members[m].subscription:
                assigned[m][topic].append(n)
                load[m] += 1
            else:
                strays.append((topic, n))
    for topic, n in strays:
        m = min(subscribers[topic], key=lambda s: (load[s], s))
        assigned[m][topic].append(n)
        load[m] += 1
    return Plan(
        numbers={m: numbers.get(m, []) for m in sorted(members)},
        partitions={m: {t: sorted(ids) for t, ids in sorted(assigned[m].items())} for m in sorted(members)},
    )


def next_epoch(claims: Iterable[Claim]) -> int:
    """The epoch of a new assignment: above every claim's, so a claim carried over from before is older."""
    return min(max((c.epoch for c in claims), default=0) + 1, MAX_EPOCH)


# ------------------------------------------------------------------------------------------------ the wire


PartitionNumber = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # Kafka's partition ids are int32
Epoch = Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH)]


class Ownership(msgspec.Struct, frozen=True):
    """The user_data of both the JoinGroup metadata (what the member owned) and the assignment (what it owns now).

    Short keys, a map (not an array): a later version may add fields, which this one ignores. `v` changes only
    when the meaning of these fields does; a member's data of another `v` counts as owning nothing.
    """

    v: Literal[1]
    n: list[PartitionNumber]
    e: Epoch


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Ownership).decode


def encode_claim(claim: Claim) -> bytes:
    return _encode(Ownership(v=1, n=sorted(claim.numbers), e=claim.epoch))


def decode_claim(data: bytes | None) -> Claim | None:
    """The claim in a member's user_data; None when there is none or it is not ours (empty, another client's,
    another version's, garbage): never raises, since one odd member must not stop the group's assignment."""
    if not data:
        return None
    try:
        ownership = _decode(data)
    except (msgspec.DecodeError, TypeError, ValueError):
        return None
    return Claim(frozenset(ownership.n), ownership.e)


# -------------------------------------------------------------------------------------------- the assignor


class CoPartitionedAssignor(AbstractPartitionAssignor):
    """aiokafka partition assignor running `plan`; pass an INSTANCE (see `assignment_strategy`).

    aiokafka's own assignors keep their state on the class (the sticky one stores the last assignment in a
    class attribute), so two consumers of one process would claim each other's partitions. aiokafka only ever
    calls `name`, `metadata`, `assign` and `on_assignment` on the objects it is given, so an instance per
    consumer works and keeps each member's ownership to itself.

    The epoch stands in for the group generation: aiokafka 0.14 never tells an assignor the generation (the
    sticky assignor's `on_generation_assignment` is not called by its coordinator), so the leader issues its
    own counter in each assignment's user_data, and members send it back with their claim at the next join.
    """

    name = PROTOCOL_NAME
    version = 0

    def __init__(self) -> None:
        self._owned = NO_CLAIM

    @property
    def owned(self) -> Claim:
        """The numbers this member was last given by this protocol (and that epoch); what its next join claims."""
        return self._owned

    @classmethod
    def assign(
        cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        partitions: dict[str, Collection[int]] = {}
        for topic in sorted({t for metadata in members.values() for t in metadata.subscription}):
            ids = cluster.partitions_for_topic(topic)
            if ids is None:
                log.warning("no partition metadata for a subscribed topic; not assigned this time",
                            extra={"event": "assignment_topic_unknown", "topic": topic})
                continue
            partitions[topic] = ids
        state = {
            m: Member(frozenset(metadata.subscription), decode_claim(metadata.user_data) or NO_CLAIM)
            for m, metadata in members.items()
        }
        epoch = next_epoch(member.claim for member in state.values())
        result = plan(partitions, state)
        kept = sum(len(state[m].claim.numbers.intersection(ns)) for m, ns in result.numbers.items())
        log.info("partition numbers assigned", extra={
            "event": "assignment_planned", "members": len(members), "epoch": epoch,
            "numbers": sum(len(ns) for ns in result.numbers.values()), "kept": kept,
        })
        return {
            m: ConsumerProtocolMemberAssignment(
                cls.version,
                list(result.partitions[m].items()),
                encode_claim(Claim(frozenset(result.numbers[m]), epoch)),
            )
            for m in members
        }

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), encode_claim(self._owned))

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        claim = decode_claim(assignment.user_data)
        if claim is None:
            # A leader that speaks our protocol name but not this user_data: claim what we were given, as
            # the oldest epoch, so a conflict goes to whoever has a real one.
            claim = Claim(frozenset(tp.partition for tp in assignment.partitions()), 0)
        self._owned = claim


def assignment_strategy(
    *, round_robin_fallback: bool = False
) -> tuple[AbstractPartitionAssignor | type[AbstractPartitionAssignor], ...]:
    """For `AIOKafkaConsumer(partition_assignment_strategy=...)`; call it once per consumer (a fresh assignor each).

    Ours alone by default. aiokafka 0.14 sends one JoinGroup per listed assignor, the first with only the first
    protocol, the next with the first two (aio-libs/aiokafka#1168, not released): a member's protocols change
    within every join, each change restarts the rebalance, and members out of step keep restarting it for one
    another. In about half of our runs, 3 members listing two assignors (even aiokafka's own round robin and
    range) were still rebalancing after 5 s: some 50 generations, no partition held.

    So no round robin to fall back on: while a member of an older version (round robin only) is in the group,
    the coordinator refuses this one's join (InconsistentGroupProtocolError, retried), and the older members
    keep every partition; this member joins once the last of them has left. `round_robin_fallback` lists
    round robin second, which lets both versions share the group (the coordinator picks a protocol every
    member supports, by their votes: round robin while an older member remains, ours after); use it only with
    an aiokafka that sends all protocols in one JoinGroup.
    """
    ours = CoPartitionedAssignor()
    return (ours, RoundRobinPartitionAssignor) if round_robin_fallback else (ours,)
