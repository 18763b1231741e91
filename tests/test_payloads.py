"""The small control-message payloads (TARGET_READY, ABORT, LOAD_REPORT)
encoded and decoded by the C core."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from xo import core
from xo.core import Endpoint, LoadReport

v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
ports = st.integers(1, 65535)


@given(ip=st.one_of(v4, v6), port=ports)
def test_ready_round_trip(ip: str, port: int) -> None:
    payload = core.encode_ready(Endpoint(ip, port))
    assert len(payload) == core.lib.XO_READY_LEN
    assert core.decode_ready(payload) == Endpoint(ip, port)


@given(reason=st.integers(0, 2**32 - 1), text=st.text(max_size=300))
def test_abort_round_trip(reason: int, text: str) -> None:
    assert core.decode_abort(core.encode_abort(reason, text)) == (reason, text)


def test_abort_text_is_capped() -> None:
    reason, text = core.decode_abort(core.encode_abort(7, "x" * 5000))
    assert (reason, len(text)) == (7, core.lib.XO_ABORT_MAX_TEXT)


@given(a=st.integers(0, 2**32 - 1), h=st.integers(0, 2**32 - 1), b=st.integers(0, 2**64 - 1))
def test_load_report_round_trip(a: int, h: int, b: int) -> None:
    report = LoadReport(a, h, b)
    assert LoadReport.decode(report.encode()) == report


def test_ready_refuses_bad_inputs() -> None:
    good = core.encode_ready(Endpoint("198.18.0.10", 8080))
    cases = {
        good[:-1]: core.lib.XO_E_TRUNCATED,
        good + b"\0": core.lib.XO_E_LENGTH,
        b"\x05" + good[1:]: core.lib.XO_E_FIELD,           # family 5
        good[:17] + b"\0\0": core.lib.XO_E_FIELD,          # port 0
        good[:10] + b"\x01" + good[11:]: core.lib.XO_E_FIELD,  # IPv6 bytes in IPv4
    }
    for payload, code in cases.items():
        with pytest.raises(core.XoDecodeError) as err:
            core.decode_ready(payload)
        assert err.value.code == code and str(err.value), payload


def test_payload_decoders_survive_random_bytes() -> None:
    rng = random.Random(1)
    refused = 0
    for _ in range(20_000):
        blob = rng.randbytes(rng.randint(0, 40))
        for decode in (core.decode_ready, LoadReport.decode):
            try:
                decode(blob)
            except core.XoDecodeError as exc:
                assert str(exc)
                refused += 1
    assert refused > 30_000


def test_abort_refuses_short_and_oversized() -> None:
    with pytest.raises(core.XoDecodeError):
        core.decode_abort(b"\0\0\0")
    with pytest.raises(core.XoDecodeError):
        core.decode_abort(b"\0\0\0\1" + b"x" * (core.lib.XO_ABORT_MAX_TEXT + 1))
