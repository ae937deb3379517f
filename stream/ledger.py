"""The sync ledger's state and decisions: what the API already accepted, per device. Pure: no I/O, no clock.

The API's documentation asks each client to track what it already sent, per device and chronologically,
because the API does not deduplicate. Per (user_id, data_type, device_name) the ledger keeps the newest
accepted start (the device's watermark) and the fingerprints of the accepted samples whose start lies
within `horizon` behind it, packed: two parallel int64 arrays sorted by start (16 bytes a sample).

Before a sample is sent, `decide` says what it is:
- NEW: newer than its device's watermark (or a device never seen): sent;
- DUPLICATE: its fingerprint is remembered: the API has it, it is not sent;
- CORRECTION: a remembered sample of the same device has the same start but other content: sent;
- LATE: older than the watermark but unknown: a late genuine sample, sent;
- BEYOND: older than the horizon and unknown: nothing remembered can tell; the caller's policy decides.

Only what the API accepted is recorded (`record`), never what was merely seen. Forgetting (the horizon, the
caps, a revoked partition) can only turn a DUPLICATE into LATE or BEYOND: a duplicate sent, never a loss.

State is per source partition number (a ledger record lives in the ledger topic's partition of the same
number): a member restores and drops exactly the partitions it is assigned.
"""

from __future__ import annotations

import heapq
import re
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable

from stream.ledger_format import DeviceSamples, LedgerRecord, fingerprint, pack, unpack

NEW, DUPLICATE, CORRECTION, LATE, BEYOND = "new", "duplicate", "correction", "late", "beyond_horizon"
KINDS = (NEW, DUPLICATE, CORRECTION, LATE, BEYOND)

SAMPLE_BYTES = 16  # a start and a fingerprint, int64 each
# Resident cost of a device beyond its samples (measured with tracemalloc in the tests): the _Device, two
# array headers, the key tuple and its strings, the dict slot.
DEVICE_BYTES = 400

DeviceKey = tuple[str, str, bytes]  # (user_id, data_type, the device_name's JSON text)

# What a packed int64 holds: 1677-09-21 to 2262-04-11 in epoch nanoseconds. A sample outside (the input contract
# takes the years 1 to 9999) is sent but never remembered.
_LOWEST, _HIGHEST = -(2**63), 2**63 - 1
# A start further in the future than this is not remembered: one mis-set clock must not move its device's
# watermark years ahead, which would leave every genuine sample after it beyond the horizon.
FUTURE_TOLERANCE_NS = 86400 * 10**9

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_DEVICE_AT = len(b'{"device_name":')


def device_of(body: bytes) -> bytes:
    """The device_name's JSON text in a sample's API bytes (stream.schema puts it first, always present)."""
    end = body.find(b'"', _DEVICE_AT + 1)
    if body.find(b"\\", _DEVICE_AT, end) < 0:
        return body[_DEVICE_AT : end + 1]
    match = _STRING.match(body, _DEVICE_AT)
    return match.group(0) if match else body[_DEVICE_AT:]


class DeviceOf:
    """device_of for a run of bodies that mostly share their device (a batch, a device's samples in a row): when
    a body starts like the previous one up to the end of its device_name, the device is the previous one's."""

    __slots__ = ("_device", "_prefix")

    def __init__(self) -> None:
        self._prefix: bytes | None = None
        self._device = b""

    def __call__(self, body: bytes) -> bytes:
        # Equal bytes up to the previous device_name's closing quote: the same string, whatever its escapes.
        if self._prefix is not None and body.startswith(self._prefix):
            return self._device
        device = device_of(body)
        self._prefix = body[: _DEVICE_AT + len(device)]
        self._device = device
        return device


class _Device:
    __slots__ = ("prints", "starts", "watermark")

    def __init__(self) -> None:
        self.starts = array("q")  # sorted
        self.prints = array("q")  # parallel to starts
        self.watermark: int | None = None


class Ledger:
    """What the API accepted, per partition and device, bounded by a horizon and a memory budget."""

    def __init__(self, horizon_ns: int, max_bytes: int, max_per_device: int) -> None:
        self.horizon_ns = horizon_ns
        self.max_bytes = max_bytes
        self.max_per_device = max_per_device
        # Every device of every partition, in order of last activity (oldest first): the order evictions follow.
        self._devices: OrderedDict[tuple[int, DeviceKey], _Device] = OrderedDict()
        self._keys: dict[int, set[DeviceKey]] = {}  # per partition: its devices (a revoke drops them at once)
        self.unreadable = 0  # ledger records' device entries skipped at restores (not two int64 arrays of one length)
        self.entries = 0
        self.devices = 0
        self.evicted = 0  # fingerprints forgotten for the memory budget or the per-device cap

    @property
    def resident_bytes(self) -> int:
        """An estimate of the memory the state holds (within a few percent: see the tests)."""
        return self.entries * SAMPLE_BYTES + self.devices * DEVICE_BYTES

    def partitions(self) -> list[int]:
        return sorted(self._keys)

    # -- deciding ---------------------------------------------------------------------------------------------

    def decide(self, partition: int, key: DeviceKey, start: int, body: bytes) -> tuple[str, int]:
        """(what the sample is, how far behind its device's watermark it starts in ns: 0 when NEW)."""
        return self.judge(self._devices.get((partition, key)), start, body)

    def device(self, partition: int, key: DeviceKey) -> _Device | None:
        """A device's state, to `judge` several of its samples with one lookup (None: never seen)."""
        return self._devices.get((partition, key))

    def judge(self, device: _Device | None, start: int, body: bytes) -> tuple[str, int]:
        """`decide`, for a device looked up already."""
        if device is None or device.watermark is None or start > device.watermark or start < _LOWEST:
            return NEW, 0
        behind = device.watermark - start
        starts = device.starts
        at = bisect_left(starts, start)
        if at < len(starts) and starts[at] == start:
            remembered = fingerprint(body)
            prints = device.prints
            while at < len(starts) and starts[at] == start:
                if prints[at] == remembered:
                    return DUPLICATE, behind
                at += 1
            return CORRECTION, behind
        return (BEYOND if behind > self.horizon_ns else LATE), behind

    # -- recording --------------------------------------------------------------------------------------------

    def record(self, partition: int, key: DeviceKey, starts: list[int], prints: list[int]) -> None:
        """Remember samples the API accepted (the caller writes the same to the ledger topic)."""
        device = self._device(partition, key)
        self._add(device, starts, prints)
        self._bound(device)

    def record_of(self, partition: int, user_id: str, data_type: str, samples: Iterable[tuple[int, bytes]],
                  now_ns: int, remember: bool = True) -> LedgerRecord:
        """Record accepted samples ((start, API bytes) of one user and data type, one partition) and return the
        ledger record to write for them (`remember=False`: only the record, for a partition no longer held).
        Samples starting before 1677, after 2262 or more than FUTURE_TOLERANCE_NS after `now_ns` are left out."""
        by_device: dict[bytes, tuple[list[int], list[int]]] = {}
        latest = min(_HIGHEST, now_ns + FUTURE_TOLERANCE_NS)
        device_in = DeviceOf()
        for start, body in samples:
            if not _LOWEST <= start <= latest:
                continue
            starts, prints = by_device.setdefault(device_in(body), ([], []))
            starts.append(start)
            prints.append(fingerprint(body))
        devices = []
        for device, (starts, prints) in by_device.items():
            if remember:
                self.record(partition, (user_id, data_type, device), starts, prints)
            devices.append(DeviceSamples(device.decode(), pack(starts), pack(prints)))
        return LedgerRecord(user_id, data_type, devices)

    def restore(self, partition: int, records: Iterable[LedgerRecord]) -> int:
        """Rebuild a partition's state from its ledger records (any order); returns the samples read."""
        gathered: dict[DeviceKey, tuple[array, array]] = {}
        read = 0
        for record in records:
            for samples in record.devices:
                if len(samples.starts) != len(samples.prints) or len(samples.starts) % 8:
                    self.unreadable += 1  # not written by this service: skipped (forgetting costs a duplicate)
                    continue
                key = (record.user_id, record.data_type, samples.device.encode())
                starts, prints = gathered.setdefault(key, (array("q"), array("q")))
                more = unpack(samples.starts)
                starts.extend(more)
                prints.extend(unpack(samples.prints))
                read += len(more)
        for key, (starts, prints) in gathered.items():
            device = self._device(partition, key)
            self._add(device, starts, prints)
            self._bound(device)
        return read

    def forget(self, partition: int, user_id: str, data_type: str | None = None) -> int:
        """Forget a user's devices in a partition (of one data type, if given): `stream ledger forget` wrote
        tombstones for them. Returns the samples forgotten (not counted as evictions: an operator asked)."""
        keys = [key for key in self._keys.get(partition, ()) if key[0] == user_id
                and (data_type is None or key[1] == data_type)]
        forgotten = 0
        for key in keys:
            forgotten += len(self._devices[(partition, key)].starts)
            self._forget_device((partition, key))
        return forgotten

    def drop(self, partition: int) -> None:
        """Forget a revoked partition's state: its next owner restores it from the ledger topic."""
        for key in list(self._keys.get(partition, ())):
            self._forget_device((partition, key))
        self._keys.pop(partition, None)

    # -- internals --------------------------------------------------------------------------------------------

    def _device(self, partition: int, key: DeviceKey) -> _Device:
        slot = (partition, key)
        device = self._devices.get(slot)
        if device is None:
            device = self._devices[slot] = _Device()
            self._keys.setdefault(partition, set()).add(key)
            self.devices += 1
        else:
            self._devices.move_to_end(slot)  # the most recently active go last
        return device

    def _add(self, device: _Device, starts: list[int] | array, prints: list[int] | array) -> None:
        before = len(device.starts)
        known = device.starts
        if type(starts) is list and starts and (not known or starts[0] > known[-1]) and starts == sorted(starts):
            # The common case, a batch just accepted (no two identical samples: copies ride apart) of samples
            # newer than any remembered, in order: appended as they are.
            known.extend(starts)
            device.prints.extend(prints)
            self._trim(device, before)
            return
        pairs = sorted(set(zip(starts, prints, strict=True)))
        if not pairs:
            return
        split = bisect_left(pairs, (known[-1] + 1,)) if known else 0  # pairs[split:] are newer than all known
        older = pairs[:split]
        if len(older) > 64:  # many late samples at once (a restore, a backfill): one linear merge
            starts, prints = array("q"), array("q")
            last = None
            for pair in heapq.merge(zip(device.starts, device.prints, strict=True), older):
                if pair != last:
                    starts.append(pair[0])
                    prints.append(pair[1])
                    last = pair
            device.starts, device.prints = starts, prints
        else:  # a few: each inserted in place (a memmove in C)
            for start, print_ in older:
                at = bisect_left(device.starts, start)
                while at < len(device.starts) and device.starts[at] == start:
                    if device.prints[at] == print_:
                        break
                    at += 1
                else:
                    device.starts.insert(at, start)
                    device.prints.insert(at, print_)
        device.starts.extend(s for s, _ in pairs[split:])
        device.prints.extend(p for _, p in pairs[split:])
        self._trim(device, before)

    def _trim(self, device: _Device, before: int) -> None:
        """Move the watermark to the newest start, forget what falls beyond the horizon behind it, count."""
        newest = device.starts[-1]
        if device.watermark is None or newest > device.watermark:
            device.watermark = newest
        # What starts beyond the horizon behind the watermark is not remembered (nothing can decide on it).
        cut = bisect_left(device.starts, device.watermark - self.horizon_ns)
        if cut:
            del device.starts[:cut]
            del device.prints[:cut]
        self.entries += len(device.starts) - before

    def _bound(self, device: _Device) -> None:
        excess = len(device.starts) - self.max_per_device
        if excess > 0:
            del device.starts[:excess]
            del device.prints[:excess]
            self.entries -= excess
            self.evicted += excess
        # Over the budget, the least recently active devices are forgotten whole (fingerprints and watermark):
        # a device's remembered samples are all older than its last activity. A device forgotten whole reads
        # as new (every sample sent), never as beyond the horizon (which a policy may dead-letter).
        while self.resident_bytes > self.max_bytes and len(self._devices) > 1:
            slot = next(iter(self._devices))
            if self._devices[slot] is device:
                break
            self.evicted += len(self._devices[slot].starts)
            self._forget_device(slot)

    def _forget_device(self, slot: tuple[int, DeviceKey]) -> None:
        device = self._devices.pop(slot)
        self._keys[slot[0]].discard(slot[1])
        self.devices -= 1
        self.entries -= len(device.starts)
