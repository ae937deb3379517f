"""The sync ledger's records in Kafka: what one accepted batch adds to the ledger, as a key and a value.

One record per accepted batch and source partition number: the batch's accepted samples, per device, as
their start instants (epoch nanoseconds) and fingerprints (a 64-bit hash of the sample's API bytes), packed
as little-endian int64 arrays. The key names the user and data type (so `stream ledger forget` can find a
user's records and tombstone them) and the record's own content hash (so the same batch recorded twice,
after a crash between the ledger write and the commit, is one key that compaction keeps once).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

import msgspec

_LITTLE = array("q").itemsize == 8 and memoryview(array("q", [1])).tobytes()[0] == 1


class DeviceSamples(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One device's samples in a ledger record: parallel packed int64 arrays."""

    device: str  # the device_name's JSON text as the producer wrote it (quotes and escapes included)
    starts: bytes  # epoch nanoseconds, int64 little-endian
    prints: bytes  # fingerprints, int64 little-endian


class LedgerRecord(msgspec.Struct, array_like=True, frozen=True, gc=False):
    user_id: str
    data_type: str
    devices: list[DeviceSamples]


class LedgerKey(msgspec.Struct, array_like=True, frozen=True, gc=False):
    user_id: str
    data_type: str
    digest: str  # hex of the value's hash: one key per distinct content


_encode = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(LedgerRecord).decode
_decode_key = msgspec.msgpack.Decoder(LedgerKey).decode


def pack(values: list[int]) -> bytes:
    packed = array("q", values)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


def unpack(data: bytes) -> array:
    packed = array("q")
    packed.frombytes(data)
    if not _LITTLE:
        packed.byteswap()
    return packed


# A blake2b state with the fingerprint's parameters and no data: copying it is quicker than building a new one
# with its parameters (hashlib parses them anew each time), and the digests are the same.
_BLANK = hashlib.blake2b(digest_size=8)


def fingerprint(body: bytes) -> int:
    """A stable 64-bit fingerprint of a sample's API bytes (signed, to fit an int64 array).

    blake2b, not Python's hash(): a fingerprint is stored in Kafka and compared by the next process.
    """
    state = _BLANK.copy()
    state.update(body)
    return int.from_bytes(state.digest(), "little", signed=True)


def fingerprints(bodies: Iterable[bytes]) -> bytes:
    """The fingerprints of samples' API bytes, packed as `pack` packs them: an 8-byte digest read as a
    little-endian int64 is the fingerprint, so the packed array is the digests one after the other."""
    copy = _BLANK.copy
    digests = []
    append = digests.append
    for body in bodies:
        state = copy()
        state.update(body)
        append(state.digest())
    return b"".join(digests)


def pack_array(values: array) -> bytes:
    """`pack` of an int64 array (in this machine's byte order) already built."""
    if _LITTLE:
        return values.tobytes()
    swapped = array("q", values)
    swapped.byteswap()
    return swapped.tobytes()


def encode_record(record: LedgerRecord) -> tuple[bytes, bytes]:
    """(key, value) of a ledger record."""
    value = _encode(record)
    digest = hashlib.blake2b(value, digest_size=8).hexdigest()
    return _encode(LedgerKey(record.user_id, record.data_type, digest)), value


def decode_record(value: bytes) -> LedgerRecord:
    """A ledger record's value; raises msgspec.DecodeError / ValidationError on bytes that are not one."""
    return _decode_record(value)


def encode_key(key: LedgerKey) -> bytes:
    return _encode(key)


def decode_key(key: bytes) -> LedgerKey:
    return _decode_key(key)
