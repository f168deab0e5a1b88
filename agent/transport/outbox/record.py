"""The outbox's record format: one message (or one checkpoint) as length-prefixed, crc-checked bytes.

A record is `len, crc32, id, ts, seq, qos, retain, topic length, stream length`, then the topic, the
stream and the payload. `len` counts what follows its first 8 bytes and the crc covers the same bytes,
so a record that a crash cut short, or that holds garbage, is told apart from a whole one. A checkpoint
(qos 255, never published) opens every segment with every stream's seq and the drop counters, so that
numbers keep rising across restarts even when every message was delivered and its segment deleted.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

# len, crc32, id, ts, seq, qos, retain, topic length, stream length.
HEAD = struct.Struct("<IIQdQBBHH")
HEADER_BYTES = HEAD.size
CHECKPOINT = 255  # qos value of a checkpoint record (seq and counters), never published


class Message(NamedTuple):
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    ts: float


@dataclass
class Record:
    id: int
    ts: float
    seq: int
    qos: int
    retain: bool
    topic: str
    stream: str
    payload: bytes
    end: int  # offset just past the record


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint record holds: the last seq of every stream, and the counters."""

    seq: dict[str, int]
    counters: dict[str, int]


def encode(
    msg_id: int, ts: float, seq: int, qos: int, retain: bool, topic: bytes, stream: bytes, payload: bytes
) -> bytes:
    body = HEAD.pack(0, 0, msg_id, ts, seq, qos, int(retain), len(topic), len(stream))[8:] + topic + stream + payload
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def encode_checkpoint(ts: float, seq: dict[str, int], counters: dict[str, int]) -> bytes:
    state = json.dumps({"seq": seq, "counters": counters}).encode()
    return encode(0, ts, 0, CHECKPOINT, False, b"", b"", state)


def read_checkpoint(rec: Record) -> Checkpoint:
    state = json.loads(rec.payload)
    return Checkpoint(
        {name: int(value) for name, value in state.get("seq", {}).items()},
        {name: int(value) for name, value in state.get("counters", {}).items()},
    )


def parse(buf: bytes, pos: int, check: bool = True) -> Record | None:
    """The record at `pos`, or None if the bytes there are incomplete or damaged.

    `check=False` skips the crc: for bytes this process wrote and has just read back (the crc guards
    against a crash cutting a record short, which recovery checks).
    """
    if len(buf) - pos < HEADER_BYTES:
        return None
    length, crc = struct.unpack_from("<II", buf, pos)
    end = pos + 8 + length
    if length < HEADER_BYTES - 8 or end > len(buf):
        return None
    if check and zlib.crc32(buf[pos + 8 : end]) != crc:
        return None
    _l, _c, msg_id, ts, seq, qos, retain, tlen, slen = HEAD.unpack_from(buf, pos)
    at = pos + HEADER_BYTES
    topic = buf[at : at + tlen].decode()
    stream = buf[at + tlen : at + tlen + slen].decode()
    return Record(msg_id, ts, seq, qos, bool(retain), topic, stream, buf[at + tlen + slen : end], end)


def record_length(data: bytes) -> int:
    """The whole length of the record that starts `data` (its first 8 bytes at least)."""
    (length,) = struct.unpack_from("<I", data, 0)
    return 8 + int(length)


def scan(data: bytes, out: deque[Message], topics: dict[bytes, str]) -> int:
    """Append the messages of the whole records in `data` to `out`; returns the bytes used.

    The publisher's hot path: one unpack per record, no crc (these bytes were written by this process
    and read back whole; recovery checks the crc after a crash), and topics decoded once into `topics`.
    """
    pos, end, unpack = 0, len(data), HEAD.unpack_from
    while end - pos >= HEADER_BYTES:
        length, _crc, msg_id, ts, _seq, qos, retain, tlen, slen = unpack(data, pos)
        stop = pos + 8 + length
        if stop > end:
            break
        if qos != CHECKPOINT:
            at = pos + HEADER_BYTES
            raw = data[at : at + tlen]
            topic = topics.get(raw)
            if topic is None:
                topic = topics[raw] = raw.decode()
            out.append(Message(msg_id, topic, data[at + tlen + slen : stop], qos, bool(retain), ts))
        pos = stop
    return pos
