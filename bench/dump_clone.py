"""Copies of a Redis ``DUMP`` payload with another session id inside, for ``RESTORE`` at scale.

A session's record names its own id (in its ``meta`` field), and the service writes a stepped
record back under the id it read, so a populated session must carry its own id, not the
template's. A ``DUMP`` payload is the value in RDB form, two bytes of RDB version and a CRC-64
(Jones polynomial, reflected, little-endian) of everything before it. With ``rdbcompression no``
the id sits in the payload as plain bytes; a new id of the same length keeps every length
prefix valid, and only the checksum must change.

The checksum is not recomputed over the whole payload (3.5 KB per session in Python is far too
slow for a million). A CRC with initial value 0 and no final xor is linear over GF(2), so
``crc(payload') = crc(payload) ^ crc(diff)``, where ``diff`` is zero except at the id: the
CRC of the 22 xored id bytes, then carried over the zero bytes that follow them, an operator
on the 64-bit register precomputed once per template.
"""

from __future__ import annotations

POLY = 0x95AC9329AC4BC9B5  # 0xad93d23594c935a9 (Redis's crc64 "Jones"), bit-reflected
CHECK = (b"123456789", 0xE9C6D914C4B8D9CA)  # the check value from Redis's src/crc64.c


def _table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _table()


def crc64(data: bytes, crc: int = 0) -> int:
    """Redis's CRC-64 of ``data`` (continuing from ``crc``)."""
    for b in data:
        crc = TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _position_tables(n_id: int, n_after: int) -> list[list[int]]:
    """Per byte of the id, 256 entries: the CRC contribution of that value at that position, with
    ``n_after`` bytes after the id (a value followed by zeros: linear, so contributions xor)."""
    # Feeding n zero bytes is linear in the register: the image of each bit, once.
    columns = [crc64(bytes(n_after), 1 << bit) for bit in range(64)]

    def after(crc: int) -> int:
        image = 0
        for bit in range(64):
            if crc >> bit & 1:
                image ^= columns[bit]
        return image

    tables = [[after(TABLE[v]) for v in range(256)]]  # the id's last byte (TABLE[v] = crc64(bytes([v])))
    for _ in range(n_id - 1):  # each earlier byte: one more zero byte after it
        tables.insert(0, [TABLE[c & 0xFF] ^ (c >> 8) for c in tables[0]])
    return tables


class DumpCloner:
    """``clone(new_id)``: the template payload with ``old_id`` replaced by ``new_id`` (same length)."""

    def __init__(self, payload: bytes, old_id: bytes) -> None:
        body, stored = payload[:-8], int.from_bytes(payload[-8:], "little")
        if crc64(body) != stored:
            raise ValueError("the payload's checksum does not match: not a Redis DUMP payload?")
        if body.count(old_id) != 1:
            raise ValueError(f"the id occurs {body.count(old_id)} times in the payload, not once (rdbcompression on?)")
        at = body.index(old_id)
        self.old_id, self.prefix, self.suffix = old_id, body[:at], body[at + len(old_id) :]
        self._tables = _position_tables(len(old_id), len(self.suffix))
        # The payload's CRC with zeros in place of the id: each id byte's contribution is xored on.
        self._crc_without_id = stored ^ self._contribution(old_id)

    def _contribution(self, ident: bytes) -> int:
        crc = 0
        for table, b in zip(self._tables, ident, strict=True):
            crc ^= table[b]
        return crc

    def clone(self, new_id: bytes) -> bytes:
        if len(new_id) != len(self.old_id):
            raise ValueError(f"ids must be {len(self.old_id)} bytes long, not {len(new_id)}")
        crc = self._crc_without_id ^ self._contribution(new_id)
        return b"".join((self.prefix, new_id, self.suffix, crc.to_bytes(8, "little")))
