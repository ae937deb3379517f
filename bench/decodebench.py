"""In-process micro-benchmark of reading records: stream.schema.decode_record, in µs per sample.

Three shapes: the documented single-sample event (the fast path: no escape, known fields only), a bundle of
100 such samples, and the single event with one escape in its device name (the detailed path, taken by any
record the fast path cannot vouch for). Best of 5 runs each, the garbage collector on, as in the service.
"""

from __future__ import annotations

import time

import msgspec

from stream.schema import Decoded, decode_record

SAMPLE = {"device_name": "iPhone", "device_version": "17.0.3", "start_date": "2023-11-01T08:04:51.000+04:00",
          "end_date": "2023-11-01T08:04:58.000+04:00", "value": 14, "unit": "count"}
USER = "85b4453a-46de-484c-bbc2-12666ebc7ed9"
SHAPES = {
    "single": (msgspec.json.encode({"user_id": USER, "data_type": "steps", **SAMPLE}), 1, 100_000),
    "bundle_100": (msgspec.json.encode({"user_id": USER, "data_type": "steps", "data": [SAMPLE] * 100}), 100, 1_000),
    "single_escaped": (
        msgspec.json.encode({"user_id": USER, "data_type": "steps", **SAMPLE}).replace(b"iPhone", b"iPh\\u006fne"),
        1, 30_000,
    ),
}


def run() -> dict[str, float]:
    out = {}
    for name, (value, samples, repeat) in SHAPES.items():
        decoded = decode_record(value)
        if not isinstance(decoded, Decoded) or len(decoded.samples) != samples:
            raise AssertionError(f"the {name} record is not accepted whole: {decoded}")
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeat):
                decode_record(value)
            best = min(best, time.perf_counter() - started)
        out[f"{name}_us_per_sample"] = best / repeat / samples * 1e6
    return out


if __name__ == "__main__":
    print(run())
