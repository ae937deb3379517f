"""The sync ledger's state and decisions: what the API already accepted, per device. Pure: no I/O, no clock.

The API's documentation asks each client to track what it already sent, per device and chronologically,
because the API does not deduplicate. Per (user_id, data_type, device_name) the ledger keeps the newest
accepted start (the device's watermark) and the fingerprints of the accepted samples whose start lies
within `horizon` behind it, packed: two parallel int64 arrays sorted by start (16 bytes a sample).

Before a sample is sent, `decide` says what it is (`verdicts_of`: of each sample of a batch, at once):
- NEW: newer than its device's watermark (or a device never seen): sent;
- DUPLICATE: its fingerprint is remembered: the API has it, it is not sent;
- CORRECTION: a remembered sample of the same device has the same start but other content: sent;
- LATE: older than the watermark but unknown: a late genuine sample, sent;
- BEYOND: older than the horizon and unknown: nothing remembered can tell; the caller's policy decides.

Only what the API accepted is recorded (`record_run`, `record_of`), never what was merely seen. Forgetting (the
horizon, the caps, a revoked partition) can only turn a DUPLICATE into LATE or BEYOND: a duplicate sent, never a
loss.

State is per source partition number (a ledger record lives in the ledger topic's partition of the same
number): a member restores and drops exactly the partitions it is assigned.
"""

from __future__ import annotations

import heapq
import re
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable
from itertools import repeat

from stream.ledger_format import DeviceSamples, LedgerRecord, fingerprint, fingerprints, pack_array, unpack

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


def shared_device(bodies: list[bytes]) -> bytes | None:
    """The device of a run of bodies when they all have the first one's (they all start like the first up to
    the end of its device_name: equal bytes up to its closing quote are the same string, whatever its escapes),
    else None. One scan in C, no call per body."""
    first = bodies[0]
    device = device_of(first)
    prefix = first[: _DEVICE_AT + len(device)]
    try:
        if all(map(bytes.startswith, bodies, repeat(prefix))):
            return device
    except TypeError:  # a body that is not bytes: the caller reads them one by one
        pass
    return None


_PREFIXES = 8  # devices of a run told apart by their prefix at most (more are rare: device_of for the others)


def by_device(bodies: list[bytes]) -> dict[bytes, list[int]]:
    """The indices of a run of bodies per device (device_of of each), devices in the order they first appear.

    A body that starts like an earlier one up to the end of its device_name has its device (for a few devices
    that take turns): one comparison per body and device known, rather than a parse."""
    groups: dict[bytes, list[int]] = {}
    known: list[tuple[bytes, list[int]]] = []  # (a body's start up to its device_name's closing quote, its group)
    for at, body in enumerate(bodies):
        for prefix, group in known:
            if body.startswith(prefix):
                group.append(at)
                break
        else:
            device = device_of(body)
            group = groups.get(device)
            if group is None:
                group = groups[device] = []
            group.append(at)
            # Only a whole JSON string ends a prefix that tells its device.
            if len(known) < _PREFIXES and len(device) > 1 and device[0] == device[-1] == 0x22:
                known.append((body[: _DEVICE_AT + len(device)], group))
    return groups


_NEW = (NEW, 0)


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

    def verdicts_of(self, user_id: str, data_type: str, numbers: list[int], starts: list[int],
                    bodies: list[bytes]) -> list[tuple[str, int]] | None:
        """`decide` of each sample of a run of one user and data type (parallel lists of their source partition
        numbers, starts and API bytes, not empty); None when every one is NEW."""
        first = numbers[0]
        device = shared_device(bodies) if numbers.count(first) == len(numbers) else None
        if device is not None:  # the common case: one device, one partition, one lookup
            return self.verdicts(self._devices.get((first, (user_id, data_type, device))), starts, bodies)
        out = [_NEW] * len(starts)
        runs: dict[int, list[int]] = {}
        for at, number in enumerate(numbers):
            runs.setdefault(number, []).append(at)
        for number, run in runs.items():
            for device, group in by_device([bodies[at] for at in run]).items():
                chosen = [run[at] for at in group]
                found = self.verdicts(self._devices.get((number, (user_id, data_type, device))),
                                      [starts[at] for at in chosen], [bodies[at] for at in chosen])
                if found is not None:
                    for at, verdict in zip(chosen, found, strict=True):
                        out[at] = verdict
        return out

    def verdicts(self, device: _Device | None, starts: list[int], bodies: list[bytes]) -> list[tuple[str, int]] | None:
        """`judge` of each of a run of one device's samples (parallel starts and API bytes); None when every one
        is NEW (the common case: a device never seen, or samples newer than its watermark)."""
        if device is None or device.watermark is None:
            return None
        watermark = device.watermark
        if min(starts) > watermark:
            return None
        again = self._sent_again(device, starts, bodies)
        if again is not None:
            return again
        horizon = self.horizon_ns
        known = device.starts
        count = len(known)
        out: list[tuple[str, int]] = []
        append = out.append
        matched: list[tuple[int, int]] = []  # (index in the run, where its start is remembered): need a fingerprint
        for index, start in enumerate(starts):
            if start > watermark or start < _LOWEST:
                append(_NEW)
                continue
            at = bisect_left(known, start)
            if at < count and known[at] == start:
                matched.append((index, at))
                append(_NEW)  # a placeholder, decided below
            else:
                behind = watermark - start
                append((BEYOND if behind > horizon else LATE, behind))
        if matched:
            prints = device.prints
            remembered = unpack(fingerprints([bodies[index] for index, _ in matched]))
            for (index, at), print_ in zip(matched, remembered, strict=True):
                start = starts[index]
                kind = CORRECTION
                while at < count and known[at] == start:
                    if prints[at] == print_:
                        kind = DUPLICATE
                        break
                    at += 1
                out[index] = (kind, watermark - start)
        return out

    @staticmethod
    def _sent_again(device: _Device, starts: list[int], bodies: list[bytes]) -> list[tuple[str, int]] | None:
        """The verdicts of a run in order whose samples up to the watermark are remembered side by side, each
        with its fingerprint (a re-sync sending again what was accepted): DUPLICATE each, the newer ones NEW.
        None when it is not so (each is judged on its own). As `judge`: a remembered (start, fingerprint) is a
        DUPLICATE wherever its start's run of equal starts begins."""
        watermark = device.watermark
        assert watermark is not None
        if starts[0] < _LOWEST or starts != sorted(starts):
            return None
        older = bisect_right(starts, watermark)  # starts[:older] are at most the watermark, the others newer
        known = device.starts
        first = bisect_left(known, starts[0])
        if first + older > len(known) or known[first : first + older] != array("q", starts[:older]):
            return None
        if device.prints[first : first + older] != unpack(fingerprints(bodies[:older])):
            return None
        return [(DUPLICATE, watermark - start) for start in starts[:older]] + [_NEW] * (len(starts) - older)

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
        pairs = list(samples)
        return self.record_run(partition, user_id, data_type, [start for start, _ in pairs],
                               [body for _, body in pairs], now_ns, remember)

    def record_run(self, partition: int, user_id: str, data_type: str, starts: list[int], bodies: list[bytes],
                   now_ns: int, remember: bool = True) -> LedgerRecord:
        """`record_of`, of the samples' starts and API bytes as two parallel lists."""
        if not starts:
            return LedgerRecord(user_id, data_type, [])
        latest = min(_HIGHEST, now_ns + FUTURE_TOLERANCE_NS)
        if not (_LOWEST <= min(starts) and max(starts) <= latest):
            kept = [at for at, start in enumerate(starts) if _LOWEST <= start <= latest]
            starts = [starts[at] for at in kept]
            bodies = [bodies[at] for at in kept]
            if not starts:
                return LedgerRecord(user_id, data_type, [])
        device = shared_device(bodies)
        if device is not None:  # the common case: the whole run is one device's
            runs = [(device, starts, bodies)]
        else:
            runs = [(device, [starts[at] for at in group], [bodies[at] for at in group])
                    for device, group in by_device(bodies).items()]
        devices = []
        for device, device_starts, device_bodies in runs:
            packed_starts = array("q", device_starts)
            packed_prints = fingerprints(device_bodies)  # little-endian already: as written in the record
            if remember:
                state = self._device(partition, (user_id, data_type, device))
                self._add(state, device_starts, unpack(packed_prints), packed_starts)
                self._bound(state)
            devices.append(DeviceSamples(device.decode(), pack_array(packed_starts), packed_prints))
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

    def _add(self, device: _Device, starts: list[int] | array, prints: list[int] | array,
             packed_starts: array | None = None) -> None:
        """Remember (start, fingerprint) pairs; `packed_starts`: the list `starts` as an int64 array already."""
        before = len(device.starts)
        known = device.starts
        if type(starts) is list and starts and (not known or starts[0] > known[-1]) and starts == sorted(starts):
            # The common case, a batch just accepted (no two identical samples: copies ride apart) of samples
            # newer than any remembered, in order: appended as they are.
            known.extend(starts if packed_starts is None else packed_starts)
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
