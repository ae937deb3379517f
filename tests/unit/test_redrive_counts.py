"""RedriveCounts (stream/redrive_counts.py) against a dict: adds in offset order or not, commits, revokes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stream.redrive_counts import RedriveCounts

TPS = ["a", "b", "c"]
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(TPS), st.integers(0, 60), st.integers(0, 9)),
    st.tuples(st.just("commit"), st.dictionaries(st.sampled_from(TPS), st.integers(0, 70), max_size=3)),
    st.tuples(st.just("revoke"), st.lists(st.sampled_from(TPS), max_size=2)),
), max_size=60)


@given(ops)
def test_it_behaves_like_a_dict(steps):
    counts, model = RedriveCounts(), {}
    for step in steps:
        if step[0] == "add":
            _, tp, offset, count = step
            counts.add(tp, offset, count)
            model[tp, offset] = count
        elif step[0] == "commit":
            counts.committed(step[1])
            model = {k: v for k, v in model.items() if k[1] >= step[1].get(k[0], 0)}
        else:
            counts.revoked(step[1])
            model = {k: v for k, v in model.items() if k[0] not in step[1]}
        assert len(counts) == len(model) and bool(counts) == bool(model)
        assert sorted(counts.items()) == sorted((tp, o, c) for (tp, o), c in model.items())
        for tp in TPS:
            for offset in range(0, 61, 7):
                assert counts.get(tp, offset) == model.get((tp, offset))


def test_in_order_adds_append_and_a_commit_cuts_the_front():
    counts = RedriveCounts()
    for offset in range(10):
        counts.add("a", offset, offset % 3)
    counts.committed({"a": 4, "b": 2})
    assert [o for _, o, _ in counts.items()] == [4, 5, 6, 7, 8, 9]
    assert counts.get("a", 3) is None and counts.get("a", 5) == 2
    counts.committed({"a": 100})
    assert not counts and counts.items() == []
