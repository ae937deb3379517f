"""In-process micro-benchmark of the service's time-window bookkeeping: stream.batching.Batcher.add_samples + poll.

For n keys, 2 samples per key arrive (two passes over the keys in a random order, as the many-keys run),
``poll`` runs after every 5000 records (one fetch of the service's default max_poll_records), and the
simulated clock advances so that every key's window timer fires once during the run (and is re-armed for
the hold). Per record this is: a dict lookup, a buffer append, and per new key one heap push, one heap pop
and one re-push: O(log n) at worst. The per-record cost should stay roughly flat from 1e4 to 1e6 keys.
"""

from __future__ import annotations

import gc
import random
import time

from stream.batching import Batcher
from stream.schema import ValidSample

POLL_EVERY = 5000
WINDOW = 5.0
HOLD = 3600.0


def run_once(keys: int, *, seed: int = 3, collect: bool = True) -> dict[str, float]:
    rng = random.Random(seed)
    names = [(f"user-{i:08d}", "steps") for i in range(keys)]
    order = names[:]
    rng.shuffle(order)
    arrivals = order + names  # first sample of every key, then the second one
    body = b'{"device_name":"iPhone","start_date":"2026-11-01T06:00:00.000+01:00","value":14,"unit":"count"}'
    samples = [[ValidSample(i, body)] for i in range(len(arrivals))]  # one record a sample, as decoded
    # The run spans three windows whatever n, so every key's window timer fires within it.
    step = 3 * WINDOW / len(arrivals)
    batcher = Batcher(max_samples=1000, window=WINDOW, hold=HOLD, max_age=86400.0)
    add, poll = batcher.add_samples, batcher.poll
    was_enabled = gc.isenabled()
    if not collect:
        gc.disable()
    try:
        started = time.perf_counter()
        now = 0.0
        sent = parked = 0
        for i, key in enumerate(arrivals):
            add(key, samples[i], None, i, 1.0e9, 1.0e9, now)
            now += step
            if i % POLL_EVERY == POLL_EVERY - 1:
                work = poll(now, 1.0e9, 16)
                sent += len(work.batches)
                parked += len(work.park) + len(work.expire)
        work = poll(now, 1.0e9, 16)
        elapsed = time.perf_counter() - started
    finally:
        if was_enabled:
            gc.enable()
    if sent or parked or batcher.buffered_samples != len(arrivals):
        raise AssertionError("the micro-benchmark expects every sample to stay buffered")
    return {
        "keys": keys,
        "records": len(arrivals),
        "seconds": elapsed,
        "us_per_record": elapsed / len(arrivals) * 1e6,
    }


def run(sizes: list[int]) -> list[dict[str, float]]:
    """Best of 3 (of 1 from a million keys) per size, with the garbage collector on (as in the service) and off."""
    out = []
    for n in sizes:
        repeat = 3 if n < 1_000_000 else 1
        on = min((run_once(n) for _ in range(repeat)), key=lambda r: r["seconds"])
        gc.collect()
        off = min((run_once(n, collect=False) for _ in range(repeat)), key=lambda r: r["seconds"])
        gc.collect()
        out.append({**on, "us_per_record_gc_off": off["us_per_record"]})
    base = out[0]["us_per_record"]
    for row in out:
        row["relative_to_smallest"] = row["us_per_record"] / base
    return out


if __name__ == "__main__":
    for row in run([10_000, 100_000, 1_000_000]):
        print(row)
