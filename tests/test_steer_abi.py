"""The Python mirrors of the BPF ABI structs (xo.steer) match
xo_core/include/xo_steer_abi.h field by field: name, offset and size of
every field, padding included, as cffi parsed the header."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from xo import steer
from xo._xo_cffi import ffi

MIRRORS = [(steer.KEY_FIELDS, "struct xo_flow_key"),
           (steer.ACTION_FIELDS, "struct xo_steer_action")]


@pytest.mark.parametrize(("fields", "ctype"), MIRRORS, ids=["flow_key", "steer_action"])
def test_mirror_matches_the_header_field_by_field(
        fields: tuple[tuple[str, str], ...], ctype: str) -> None:
    assert steer.mirror_layout(fields) == steer.c_layout(ctype)
    assert [name for name, _ in fields] == [name for name, _ in ffi.typeof(ctype).fields]
    c_fields = dict(ffi.typeof(ctype).fields)
    for name, offset, size in steer.mirror_layout(fields):
        assert ffi.offsetof(ctype, name) == offset, name
        assert ffi.sizeof(c_fields[name].type) == size, name
    assert steer.abi_mismatches(fields, ctype) == []


def test_swapped_fields_of_equal_size_total_are_caught() -> None:
    """A size check alone passes this (same total); the field check does not."""
    swapped = list(steer.ACTION_FIELDS)
    i = [n for n, _ in swapped].index("new_dst_port")
    swapped[i], swapped[i + 2] = swapped[i + 2], swapped[i]  # port <-> dst_mac
    diffs = steer.abi_mismatches(tuple(swapped), "struct xo_steer_action")
    assert diffs and "new_dst_port" in " ".join(diffs)


def test_packed_bytes_land_in_the_named_c_fields() -> None:
    """Values packed by the mirror read back from cffi by field name."""
    key = steer.FlowKey.tcp("198.18.0.1", 40000, "198.19.0.2", 80)
    ck = ffi.from_buffer("struct xo_flow_key *", key.packed)
    assert bytes(ck.src_addr)[:4] == bytes([198, 18, 0, 1])
    assert bytes(ck.dst_addr)[:4] == bytes([198, 19, 0, 2])
    assert (socket.ntohs(ck.src_port), socket.ntohs(ck.dst_port)) == (40000, 80)
    assert (ck.family, ck.proto, bytes(ck.pad)) == (socket.AF_INET, socket.IPPROTO_TCP, b"\0\0")
    rule = steer.Rule(steer.Kind.REDIRECT, new_dst=ipaddress.ip_address("2001:2::7"),
                      new_dst_port=8080, dst_mac="02:00:00:00:00:01",
                      src_mac="02:00:00:00:00:02", ifindex=7, owner=0x1234,
                      expires_ns=0x0102030405060708, packets=5, bytes=6)
    ca = ffi.from_buffer("struct xo_steer_action *", rule.packed)
    assert ca.kind == steer.Kind.REDIRECT and ca.ifindex == 7 and ca.owner == 0x1234
    assert bytes(ca.new_dst_addr) == ipaddress.ip_address("2001:2::7").packed
    assert socket.ntohs(ca.new_dst_port) == 8080
    assert bytes(ca.dst_mac) == bytes([2, 0, 0, 0, 0, 1])
    assert bytes(ca.src_mac) == bytes([2, 0, 0, 0, 0, 2])
    assert (ca.expires_ns, ca.packets, ca.bytes) == (0x0102030405060708, 5, 6)
