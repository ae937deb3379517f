"""The refusal-storm guard's arithmetic on a fake clock: when it trips, when it does not, what counts as
evidence, how evidence leaves the window, how a probe ends a storm, and the fate of a refused batch."""

from __future__ import annotations

import itertools
import random

import pytest

from stream.refusals import Change, RefusalGuard, Verdict

HOLD, DEAD_LETTER = Verdict.HOLD, Verdict.DEAD_LETTER


def guard(**kwargs) -> RefusalGuard:
    return RefusalGuard(**{"window": 60.0, "min_batches": 10, "share": 0.5, **kwargs})


def refuse_all(g: RefusalGuard, batches, now: float, samples: int = 100) -> list[Change | None]:
    return [g.answered(b, samples, samples, now) for b in batches]


def accept_all(g: RefusalGuard, batches, now: float, samples: int = 100) -> list[Change | None]:
    return [g.answered(b, samples, 0, now) for b in batches]


# -- tripping -------------------------------------------------------------------------------------------


def test_trips_once_min_batches_after_a_refusal_refused_more_than_the_share():
    g = guard()
    assert g.answered("first", 100, 100, now=0.0) is None  # a suspect
    assert refuse_all(g, [f"b{i}" for i in range(9)], now=1.0) == [None] * 9  # 9 after it: not enough
    assert not g.tripped
    assert g.answered("b9", 100, 100, now=2.0) is Change.TRIPPED  # the 10th after it
    assert g.tripped and g.tripped_at == 2.0 and g.storms == 1
    assert g.verdict("first", since=0.0, now=2.0) is HOLD


def test_an_accepted_batch_can_complete_the_evidence():
    g = guard()
    g.answered("first", 100, 100, now=0.0)
    refuse_all(g, [f"b{i}" for i in range(9)], now=1.0)
    assert g.answered("ok", 100, 0, now=2.0) is Change.TRIPPED  # 900 of 1000 refused after "first"


def test_does_not_trip_with_too_few_batches():
    g = guard()
    refuse_all(g, range(10), now=0.0)  # 10 in all: the first has only 9 after it
    assert not g.tripped
    assert g.window_share(0.0) == 1.0 and g.window_batches(0.0) == 10
    assert g.verdict(0, since=0.0, now=0.0) is HOLD  # not enough evidence yet either way


def test_re_sends_of_one_batch_are_not_new_evidence():
    g = guard(min_batches=3)
    for t in range(50):
        assert g.answered("the same batch", 100, 100, now=float(t)) is None
    assert not g.tripped
    assert g.window_batches(49.0) == 1
    assert g.window_share(49.0) == 1.0
    assert refuse_all(g, ["a", "b"], now=50.0) == [None, None]
    assert g.answered("c", 100, 100, now=50.0) is Change.TRIPPED


def test_the_share_is_of_samples_and_must_be_exceeded():
    g = guard(min_batches=4)
    g.answered("suspect", 10, 10, now=0.0)
    g.answered("a", 100, 100, now=0.0)
    g.answered("b", 100, 0, now=0.0)
    g.answered("c", 100, 50, now=0.0)
    # After the suspect: 150 refused of 300 samples, exactly the share: not more than it.
    assert g.answered("d", 100, 50, now=0.0) is None
    assert not g.tripped
    assert g.answered("e", 100, 51, now=0.0) is Change.TRIPPED  # 201 of 400 after "suspect"


def test_evidence_from_before_a_refusal_does_not_acquit_it():
    # A minute of healthy traffic, then the API starts refusing everything: the first refusals are not
    # "isolated among accepted batches", they are the start of a storm.
    g = guard()
    for t in range(60):
        accept_all(g, [f"ok{t}-{i}" for i in range(5)], now=float(t))
    assert g.answered("r0", 100, 100, now=60.0) is None
    assert g.verdict("r0", since=60.0, now=60.0) is HOLD
    assert g.window_share(60.0) < 0.01  # the window as a whole still looks healthy
    changes = refuse_all(g, [f"r{i}" for i in range(1, 11)], now=61.0)
    assert changes[-1] is Change.TRIPPED and changes[:-1] == [None] * 9


def test_one_big_bad_batch_among_small_accepted_ones_is_isolated_not_a_storm():
    g = guard()
    g.answered("big", 1000, 1000, now=0.0)
    accept_all(g, [f"small{i}" for i in range(10)], now=1.0, samples=50)  # 1000 of 1500 samples refused
    assert not g.tripped
    assert g.verdict("big", since=0.0, now=1.0) is DEAD_LETTER


def test_a_refusal_followed_by_accepted_batches_is_isolated():
    g = guard()
    g.answered("bad", 100, 100, now=0.0)
    accept_all(g, [f"ok{i}" for i in range(9)], now=1.0)
    assert g.verdict("bad", since=0.0, now=1.0) is HOLD  # 9 after it: not enough to judge
    accept_all(g, ["ok9"], now=2.0)
    assert g.verdict("bad", since=0.0, now=2.0) is DEAD_LETTER


def test_a_lone_refusal_in_a_quiet_system_is_dead_lettered_after_one_window():
    g = guard()
    g.answered("lone", 100, 100, now=0.0)
    for t in (1.0, 10.0, 30.0, 59.9):
        g.answered("lone", 100, 100, now=t)  # its re-sends
        assert g.verdict("lone", since=0.0, now=t) is HOLD
    assert g.verdict("lone", since=0.0, now=60.0) is DEAD_LETTER
    assert not g.tripped


def test_refusals_spread_wider_than_the_window_do_not_trip():
    # One refused batch every 7 s: never 10 of them within a minute after any one of them.
    g = guard()
    for i in range(100):
        assert g.answered(i, 100, 100, now=7.0 * i) is None
    assert not g.tripped
    assert g.window_batches(7.0 * 99) == 9  # 60 s hold 9 of them


def test_evidence_leaves_the_window():
    g = guard(window=10.0, min_batches=2)
    g.answered("old", 100, 100, now=0.0)
    assert g.window_share(0.0) == 1.0
    accept_all(g, ["a"], now=5.0)
    assert g.window_share(5.0) == 0.5
    assert g.window_share(10.0) == 0.5  # still within 10 s
    assert g.window_share(10.5) == 0.0  # "old" left; "a" is accepted
    assert g.window_batches(10.5) == 1
    # The suspect left too: refusals after it no longer count toward a storm through it.
    assert refuse_all(g, ["b"], now=10.5) == [None]
    assert not g.tripped
    assert g.window_share(16.0) == 1.0  # "a" left


def test_a_batch_counts_anew_once_its_first_answer_left_the_window():
    g = guard(window=10.0)
    g.answered("x", 100, 0, now=0.0)
    g.answered("x", 100, 100, now=5.0)  # a re-send: not counted
    assert g.window_share(5.0) == 0.0
    g.answered("x", 100, 100, now=11.0)
    assert g.window_share(11.0) == 1.0


def test_many_isolated_refusals_never_trip():
    # 1 % of batches have one of their 10 samples refused, over 100,000 batches at 100 a second.
    g = guard()
    rng = random.Random(7)
    for n in range(100_000):
        refused = 1 if rng.random() < 0.01 else 0
        assert g.answered(n, 10, refused, now=n / 100) is None
    assert not g.tripped
    assert 0.0005 < g.window_share(1000.0) < 0.002


def test_mostly_refusing_207s_trip_too():
    g = guard()
    changes = [g.answered(i, 100, 80, now=float(i)) for i in range(11)]  # 207s refusing 80 of 100
    assert changes[-1] is Change.TRIPPED


def test_isolated_whole_refusals_in_busy_traffic_never_trip():
    # Every 20th batch refused whole, the rest accepted: 5 % of samples; every refusal is judged isolated.
    g = guard()
    for n in range(5000):
        refused = 100 if n % 20 == 0 else 0
        assert g.answered(n, 100, refused, now=n / 50) is None
        if n >= 20 and (n - 20) % 20 == 0:
            assert g.verdict(n - 20, since=(n - 20) / 50, now=n / 50) is DEAD_LETTER
    assert not g.tripped


# -- ending a storm -------------------------------------------------------------------------------------


def tripped_guard() -> RefusalGuard:
    g = guard()
    refuse_all(g, range(11), now=0.0)
    assert g.tripped
    return g


def test_a_refused_probe_keeps_the_storm_and_an_accepted_one_ends_it():
    g = tripped_guard()
    assert g.answered("probe", 100, 100, now=5.0) is None
    assert g.answered("probe", 100, 60, now=10.0) is None  # 207 refusing more than the share: still a storm
    assert g.tripped
    assert g.answered("probe", 100, 0, now=15.0) is Change.ENDED
    assert not g.tripped and g.tripped_at is None
    assert g.reset_at == 15.0
    # The evidence is forgotten: what follows is judged afresh.
    assert g.window_batches(15.0) == 0 and g.window_share(15.0) == 0.0
    refuse_all(g, range(100, 110), now=16.0)
    assert not g.tripped
    assert g.answered(110, 100, 100, now=16.0) is Change.TRIPPED
    assert g.storms == 2


def test_a_probe_refusing_at_most_the_share_ends_the_storm():
    g = tripped_guard()
    assert g.answered("probe", 100, 50, now=5.0) is Change.ENDED


def test_a_batch_refused_before_the_evidence_was_reset_is_judged_afresh():
    g = tripped_guard()
    assert g.verdict(0, since=0.0, now=1.0) is HOLD
    g.answered("probe", 100, 0, now=100.0)  # the storm lasted longer than a window
    # Refused long ago, but during the storm: not a lone refusal a window old, it is sent again first.
    assert g.verdict(0, since=0.0, now=100.0) is HOLD
    g.answered(0, 100, 100, now=101.0)  # refused again after the storm: a suspect of its own
    assert g.verdict(0, since=101.0, now=101.0) is HOLD
    assert g.verdict(0, since=101.0, now=161.0) is DEAD_LETTER


def test_the_gauge_follows_the_storm():
    g = tripped_guard()
    for t in range(1, 200, 5):
        g.answered(f"probe{t}", 100, 100, now=float(t))  # probes of other batches, all refused
    assert g.window_share(200.0) == 1.0
    assert g.window_batches(200.0) == 12  # the probes of the last minute


# -- off ------------------------------------------------------------------------------------------------


def test_off_dead_letters_every_refusal_and_never_trips():
    g = guard(enabled=False)
    assert refuse_all(g, range(100), now=0.0) == [None] * 100
    assert not g.tripped
    assert g.verdict(0, since=0.0, now=0.0) is DEAD_LETTER
    assert g.window_share(0.0) == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"window": 0.0}, {"min_batches": 0}, {"share": 0.0}, {"share": 1.0}, {"share": 1.5}]
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        guard(**kwargs)


def test_refused_counts_are_clamped_to_the_batch():
    g = guard(min_batches=1)
    g.answered("a", 10, 50, now=0.0)  # more refused than sent: all of it
    assert g.window_share(0.0) == 1.0
    tickets = itertools.count()
    assert g.answered(next(tickets), 10, -3, now=0.0) is None
    assert g.window_share(0.0) == 0.5


# -- settings -------------------------------------------------------------------------------------------


def test_the_settings_have_documented_defaults_and_a_switch():
    from stream.config import load

    settings = load({})
    assert settings.refusal_storm_guard is True
    assert settings.refusal_storm_window_seconds == 60.0
    assert settings.refusal_storm_min_batches == 10
    assert settings.refusal_storm_share == 0.5
    for word, on in (("off", False), ("OFF", False), ("false", False), ("no", False), ("0", False),
                     ("on", True), ("true", True), ("yes", True), ("1", True)):
        assert load({"STREAM_REFUSAL_STORM_GUARD": word}).refusal_storm_guard is on, word
    assert load({}, {"refusal_storm_guard": "off"}).refusal_storm_guard is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STREAM_REFUSAL_STORM_GUARD", "maybe"),
        ("STREAM_REFUSAL_STORM_SHARE", "0"),
        ("STREAM_REFUSAL_STORM_SHARE", "1"),
        ("STREAM_REFUSAL_STORM_SHARE", "half"),
        ("STREAM_REFUSAL_STORM_MIN_BATCHES", "0"),
        ("STREAM_REFUSAL_STORM_WINDOW_SECONDS", "0"),
        ("STREAM_REFUSAL_STORM_WINDOW_SECONDS", "inf"),
    ],
)
def test_a_bad_guard_setting_names_its_variable(variable, value):
    from stream.config import ConfigError, load

    with pytest.raises(ConfigError) as caught:
        load({variable: value})
    assert str(caught.value).startswith(variable + ":")
