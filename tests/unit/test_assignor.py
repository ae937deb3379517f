"""Assignment by partition number: co-partitioned (one member holds partition N of every topic, so one member
owns ledger partition N), balanced, sticky (only the surplus moves: each move is a ledger restore), and never
thrown off by what another member sends."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyAssignorUserDataV1
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.assignor import (
    NO_CLAIM,
    PROTOCOL_NAME,
    Claim,
    CoPartitionedAssignor,
    Member,
    assignment_strategy,
    decode_claim,
    encode_claim,
    plan,
    plan_numbers,
)

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)

MEMBER_IDS = [f"consumer-{c}" for c in "abcdef"]
TOPICS = ["samples", "samples-eu", "pending"]

claims_st = st.dictionaries(
    st.sampled_from(MEMBER_IDS),
    # Numbers up to 14 over partitions up to 11: some claims name numbers that no longer exist.
    st.builds(Claim, st.frozensets(st.integers(0, 14), max_size=10), st.integers(0, 3)),
    max_size=6,
)
numbers_st = st.frozensets(st.integers(0, 11), max_size=12)
layout_st = st.dictionaries(st.sampled_from(TOPICS), st.integers(0, 8).map(range), min_size=1)


def winners(numbers: frozenset[int], claims: dict[str, Claim]) -> dict[str, set[int]]:
    """The documented conflict rule, spelled out: latest epoch, then fewer valid claims, then member id."""
    valid = {m: c.numbers & numbers for m, c in claims.items()}
    won: dict[str, set[int]] = {m: set() for m in claims}
    for n in numbers:
        claimants = [m for m in claims if n in valid[m]]
        if claimants:
            won[min(claimants, key=lambda m: (-claims[m].epoch, len(valid[m]), m))].add(n)
    return won


# ------------------------------------------------------------------------------------------ plan_numbers


@PROPERTY
@given(numbers_st, claims_st)
def test_every_number_goes_to_exactly_one_member_and_shares_differ_by_at_most_one(numbers, claims):
    result = plan_numbers(numbers, claims)

    assert set(result) == set(claims)
    given_out = [n for ns in result.values() for n in ns]
    if claims:
        assert sorted(given_out) == sorted(numbers)  # each existing number once, nothing else
        sizes = [len(ns) for ns in result.values()]
        assert max(sizes) - min(sizes) <= 1
    for ns in result.values():
        assert ns == sorted(ns)


@PROPERTY
@given(numbers_st, claims_st)
def test_only_the_surplus_moves(numbers, claims):
    """Minimal movement: with w_m the numbers member m won (its valid claims, conflicts resolved), base = u // n
    and extra = u % n, a member keeps exactly min(w_m, its new share) of them (it never gives one of its own
    away while taking another's), and the kept total is Σ min(w_m, base) + min(extra, #{m: w_m > base}), which
    is the most any plan with shares of base or base + 1 can keep."""
    if not claims:
        return
    result = plan_numbers(numbers, claims)
    won = winners(numbers, claims)
    base, extra = divmod(len(numbers), len(claims))

    for m, ns in result.items():
        assert len(won[m] & set(ns)) == min(len(won[m]), len(ns))
    kept = sum(len(won[m] & set(result[m])) for m in claims)
    assert kept == sum(min(len(w), base) for w in won.values()) + min(
        extra, sum(len(w) > base for w in won.values())
    )


@PROPERTY
@given(numbers_st, claims_st)
def test_the_same_inputs_give_the_same_plan_whatever_their_order(numbers, claims):
    first = plan_numbers(sorted(numbers), claims)
    again = plan_numbers([*sorted(numbers, reverse=True), *numbers], dict(reversed(list(claims.items()))))
    assert again == first


def test_a_new_member_takes_only_the_surplus():
    before = {"a": Claim(frozenset({0, 1, 2}), 5), "b": Claim(frozenset({3, 4, 5}), 5)}
    after = plan_numbers(range(6), {**before, "c": NO_CLAIM})
    assert after["a"] == [0, 1] and after["b"] == [3, 4]  # each gives up one, keeps the rest
    assert after["c"] == [2, 5]


def test_a_leaving_members_numbers_go_to_the_members_with_fewest():
    claims = {"a": Claim(frozenset({0, 1}), 5), "b": Claim(frozenset({2}), 5)}  # "c" held 3 and 4, and left
    assert plan_numbers(range(5), claims) == {"a": [0, 1, 4], "b": [2, 3]}


def test_new_numbers_are_spread_over_the_members_with_fewest():
    claims = {"a": Claim(frozenset({0, 1}), 5), "b": Claim(frozenset({2, 3}), 5), "c": NO_CLAIM}
    assert plan_numbers(range(8), claims) == {"a": [0, 1, 6], "b": [2, 3, 7], "c": [4, 5]}


def test_a_stale_claim_loses_to_the_latest_epoch():
    # "a" was away while the group moved on: it still claims 0-3 from epoch 2; "b" got 0 and 1 at epoch 7.
    claims = {
        "a": Claim(frozenset({0, 1, 2, 3}), 2),
        "b": Claim(frozenset({0, 1}), 7),
        "c": Claim(frozenset({2, 3}), 7),
    }
    result = plan_numbers(range(6), claims)
    assert result["b"] == [0, 1] and result["c"] == [2, 3]
    assert result["a"] == [4, 5]


def test_claims_of_one_epoch_go_to_the_member_claiming_fewer_then_to_the_lower_id():
    claims = {"a": Claim(frozenset({0, 1, 2}), 3), "b": Claim(frozenset({2}), 3)}
    assert plan_numbers(range(4), claims) == {"a": [0, 1], "b": [2, 3]}
    claims = {"b": Claim(frozenset({0}), 3), "a": Claim(frozenset({0}), 3)}
    assert plan_numbers(range(2), claims) == {"a": [0], "b": [1]}


def test_claims_of_numbers_that_do_not_exist_are_ignored():
    claims = {"a": Claim(frozenset({7, 8, 9}), 4), "b": Claim(frozenset({0}), 4)}
    assert plan_numbers(range(2), claims) == {"a": [1], "b": [0]}


def test_no_members_no_plan_and_no_numbers_empty_shares():
    assert plan_numbers(range(4), {}) == {}
    assert plan_numbers([], {"a": Claim(frozenset({1}), 1)}) == {"a": []}


# --------------------------------------------------------------------------------------- plan over topics


@PROPERTY
@given(layout_st, claims_st)
def test_alike_subscriptions_give_one_member_partition_n_of_every_topic(layout, claims):
    subscription = frozenset(layout)
    result = plan(layout, {m: Member(subscription, c) for m, c in claims.items()})

    for m in claims:
        numbers = result.numbers[m]
        for topic, ids in layout.items():
            assert result.partitions[m].get(topic, []) == [n for n in numbers if n in ids]
    # Unit N is every (topic, N) that exists: topics of different partition counts share the low numbers.
    assert sorted(n for ns in result.numbers.values() for n in ns) == (
        sorted({n for ids in layout.values() for n in ids}) if claims else []
    )


@PROPERTY
@given(
    layout_st,
    st.dictionaries(
        st.sampled_from(MEMBER_IDS),
        st.builds(Member, st.frozensets(st.sampled_from([*TOPICS, "elsewhere"])),
                  st.builds(Claim, st.frozensets(st.integers(0, 10), max_size=6), st.integers(0, 3))),
        max_size=6,
    ),
)
def test_differing_subscriptions_still_assign_every_subscribed_partition_once(layout, members):
    result = plan(layout, members)

    assert set(result.partitions) == set(members)
    given_out = Counter((t, n) for m in members for t, ids in result.partitions[m].items() for n in ids)
    subscribed = {t for member in members.values() for t in member.subscription}
    assert given_out.keys() == {(t, n) for t, ids in layout.items() if t in subscribed for n in ids}
    assert set(given_out.values()) <= {1}
    owner = {n: m for m, ns in result.numbers.items() for n in ns}
    for m, topics in result.partitions.items():
        for t, ids in topics.items():
            assert t in members[m].subscription
            for n in ids:  # co-partitioned wherever the subscriptions allow it
                assert owner[n] == m or t not in members[owner[n]].subscription


def test_a_partition_its_numbers_owner_does_not_subscribe_to_goes_to_the_least_loaded_subscriber():
    layout = {"samples": range(4), "pending": range(4)}
    members = {
        "a": Member(frozenset({"samples", "pending"}), Claim(frozenset({0, 1}), 2)),
        "b": Member(frozenset({"samples", "pending"}), Claim(frozenset({2}), 2)),
        "c": Member(frozenset({"samples"}), Claim(frozenset({3}), 2)),  # an old deploy without the pending topic
    }
    result = plan(layout, members)
    assert result.numbers == {"a": [0, 1], "b": [2], "c": [3]}
    assert result.partitions["c"] == {"samples": [3]}
    assert result.partitions["b"] == {"pending": [2, 3], "samples": [2]}  # b had 2 partitions, a had 4


def test_members_subscribed_to_none_of_the_topics_get_nothing_and_take_no_share():
    layout = {"samples": range(2)}
    members = {"a": Member(frozenset({"samples"})), "z": Member(frozenset({"other"}))}
    result = plan(layout, members)
    assert result.numbers == {"a": [0, 1], "z": []}
    assert result.partitions == {"a": {"samples": [0, 1]}, "z": {}}


# ------------------------------------------------------------------------------------------------ the wire


@PROPERTY
@given(st.builds(Claim, st.frozensets(st.integers(0, 2**31 - 1)), st.integers(0, 2**63 - 1)))
def test_a_claim_survives_its_encoding(claim):
    assert decode_claim(encode_claim(claim)) == claim


@PROPERTY
@given(st.binary(max_size=64))
def test_any_bytes_decode_to_a_claim_or_to_none_without_raising(data):
    claim = decode_claim(data)
    assert claim is None or isinstance(claim, Claim)


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"\xff\x00 not msgpack",
        b'{"v": 1, "n": [0], "e": 1}',  # JSON, not msgpack
        msgspec.msgpack.encode([1, [0, 1], 3]),  # an array, not our map
        msgspec.msgpack.encode({"v": 2, "n": [0], "e": 1}),  # a version this code does not know
        msgspec.msgpack.encode({"v": 1, "n": [-1], "e": 1}),
        msgspec.msgpack.encode({"v": 1, "n": [2**31], "e": 1}),
        msgspec.msgpack.encode({"v": 1, "n": [0], "e": -5}),
        msgspec.msgpack.encode({"v": 1, "n": [0]}),
        StickyAssignorUserDataV1([("samples", [0, 1])], 4).encode(),  # aiokafka's sticky assignor's user_data
    ],
)
def test_user_data_that_is_not_ours_claims_nothing(data):
    assert decode_claim(data) is None


def test_fields_a_later_version_adds_are_ignored():
    data = msgspec.msgpack.encode({"v": 1, "n": [3, 1], "e": 9, "rack": "eu-1"})
    assert decode_claim(data) == Claim(frozenset({1, 3}), 9)


# ------------------------------------------------------------------------------------- the aiokafka class


class FakeCluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self._partitions.get(topic)
        return None if count is None else set(range(count))


def joined(metadata: ConsumerProtocolMemberMetadata) -> ConsumerProtocolMemberMetadata:
    """What the leader gets: the member's metadata through the JoinGroup wire format."""
    return ConsumerProtocolMemberMetadata.decode(metadata.encode())


def rebalance(cluster: FakeCluster, group: dict[str, CoPartitionedAssignor], topics: list[str]) -> dict[str, dict]:
    """One join and sync as aiokafka runs it: every member's metadata() to the leader's assign(), each member's
    share (through the SyncGroup wire format) to its on_assignment(). Returns member -> topic -> partitions."""
    members = {m: joined(assignor.metadata(topics)) for m, assignor in group.items()}
    leader = group[min(group)]
    assignments = leader.assign(cluster, members)
    assert set(assignments) == set(members)
    shares = {}
    for m, assignor in group.items():
        received = ConsumerProtocolMemberAssignment.decode(assignments[m].encode())
        assignor.on_assignment(received)
        shares[m] = {topic: sorted(ids) for topic, ids in received.assignment}
    return shares


def numbers_per_topic(share: dict[str, list[int]]) -> set[tuple[int, ...]]:
    return {tuple(ids) for ids in share.values()}


def test_assign_is_co_partitioned_balanced_and_sticky_across_rebalances():
    cluster = FakeCluster({"samples": 6, "pending": 6})
    topics = ["samples", "pending"]
    group = {m: CoPartitionedAssignor() for m in ("m1", "m2", "m3")}

    first = rebalance(cluster, group, topics)
    for share in first.values():
        assert share.keys() == {"samples", "pending"} and len(numbers_per_topic(share)) == 1  # same N in both
        assert len(share["samples"]) == 2

    del group["m2"]  # it left the group
    second = rebalance(cluster, group, topics)
    for m in ("m1", "m3"):
        assert set(first[m]["samples"]) <= set(second[m]["samples"])  # nothing a survivor had moved
        assert len(second[m]["samples"]) == 3 and len(numbers_per_topic(second[m])) == 1

    group["m4"] = CoPartitionedAssignor()
    third = rebalance(cluster, group, topics)
    for m in ("m1", "m3"):
        assert set(third[m]["samples"]) <= set(second[m]["samples"])  # survivors only give up their surplus
        assert len(third[m]["samples"]) == 2
    assert len(third["m4"]["samples"]) == 2 and len(numbers_per_topic(third["m4"])) == 1


def test_a_members_next_join_claims_what_it_was_assigned_with_the_new_epoch():
    cluster = FakeCluster({"samples": 4, "pending": 4})
    group = {"m1": CoPartitionedAssignor(), "m2": CoPartitionedAssignor()}
    assert decode_claim(group["m1"].metadata(["samples"]).user_data) == NO_CLAIM  # a fresh member owns nothing

    shares = rebalance(cluster, group, ["samples", "pending"])
    epochs = set()
    for m, assignor in group.items():
        claim = decode_claim(joined(assignor.metadata(["samples", "pending"])).user_data)
        assert claim is not None and claim.numbers == set(shares[m]["samples"]) == set(shares[m]["pending"])
        assert claim == assignor.owned
        epochs.add(claim.epoch)
    assert epochs == {1}

    rebalance(cluster, group, ["samples", "pending"])
    assert {a.owned.epoch for a in group.values()} == {2}  # the leader issues an epoch above every claim


def test_two_assignors_in_one_process_keep_their_ownership_apart():
    one, two = assignment_strategy()[0], assignment_strategy()[0]
    assert one is not two
    shares = rebalance(FakeCluster({"samples": 4}), {"m1": one, "m2": two}, ["samples"])
    assert one.owned.numbers == set(shares["m1"]["samples"])
    assert two.owned.numbers == set(shares["m2"]["samples"])
    assert one.owned.numbers.isdisjoint(two.owned.numbers)


def test_members_with_garbage_or_foreign_user_data_own_nothing_and_the_others_keep_theirs():
    cluster = FakeCluster({"samples": 4, "pending": 4})
    members = {
        "good": ConsumerProtocolMemberMetadata(0, ["samples", "pending"], encode_claim(Claim(frozenset({2, 3}), 5))),
        "empty": ConsumerProtocolMemberMetadata(0, ["samples", "pending"], b""),
        "garbage": ConsumerProtocolMemberMetadata(0, ["samples", "pending"], b"\x00\x01\x02garbage"),
    }
    assignments = CoPartitionedAssignor.assign(cluster, {m: joined(md) for m, md in members.items()})
    shares = {m: dict(a.assignment) for m, a in assignments.items()}
    assert shares["good"] == {"samples": [2, 3], "pending": [2, 3]}
    assert shares["empty"] == {"samples": [0], "pending": [0]}
    assert shares["garbage"] == {"samples": [1], "pending": [1]}


def test_a_topic_without_metadata_is_left_out_and_the_rest_assigned():
    assignments = CoPartitionedAssignor.assign(
        FakeCluster({"samples": 2}),
        {"m1": joined(ConsumerProtocolMemberMetadata(0, ["samples", "not-yet-created"], b""))},
    )
    assert dict(assignments["m1"].assignment) == {"samples": [0, 1]}


def test_an_assignment_without_our_user_data_is_claimed_as_the_oldest_epoch():
    assignor = CoPartitionedAssignor()
    assignor.on_assignment(ConsumerProtocolMemberAssignment(0, [("samples", [1, 3]), ("pending", [1])], b"?"))
    assert assignor.owned == Claim(frozenset({1, 3}), 0)


def test_the_strategy_is_ours_alone_unless_the_round_robin_fallback_is_asked_for():
    # Alone: aiokafka 0.14 joins once per listed assignor, and two assignors can keep a group rebalancing.
    (ours,) = assignment_strategy()
    assert isinstance(ours, CoPartitionedAssignor) and ours.name == PROTOCOL_NAME == "stream-copartitioned"

    ours, fallback = assignment_strategy(round_robin_fallback=True)  # listed first: what this version prefers
    assert isinstance(ours, CoPartitionedAssignor)
    assert fallback is RoundRobinPartitionAssignor and fallback.name == "roundrobin"
