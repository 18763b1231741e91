"""The TLS rows of ``xo bench handoff --tls``: what the TLS part of a state
costs to serialize and restore (the paper's Table 3 serialize/restore rows
for a TLS connection).

Timed around the C calls from Python (perf_counter_ns, so each figure holds
well under 1 µs of cffi overhead), for every version and cipher the core
carries, on a state that also holds a TCP part (as a handoff's does):

* derive: the record state from OpenSSL key-log secrets (xo_tls13_state /
  xo_tls12_state), what the host does at a handoff;
* encode / decode: the whole state with the TLS field, minus the same state
  without it (the TLS part of the codec);
* restore (user space): building the core's record layer from the state
  (xo_tls_rec_new + xo_tls_rec_free);
* restore (kernel TLS) is not timed here (it needs a repaired socket per
  sample); the table says whether the kernel has TLS at all.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

from xo import core
from xo._xo_cffi import ffi, lib

PAPER = {"serialize_us": "2-3", "restore_us": "15-20"}
CASES = [(v, c) for v in (core.TLS_1_2, core.TLS_1_3)
         for c in (core.TLS_AES_GCM_128, core.TLS_AES_GCM_256, core.TLS_CHACHA20_POLY1305)]
NAMES = {core.TLS_1_2: "TLS 1.2", core.TLS_1_3: "TLS 1.3", core.TLS_AES_GCM_128: "AES-GCM-128",
         core.TLS_AES_GCM_256: "AES-GCM-256", core.TLS_CHACHA20_POLY1305: "ChaCha20-Poly1305"}


def _time(fn: Callable[[], None], iterations: int) -> list[int]:
    out = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def _p(samples: list[int]) -> dict[str, float]:
    us = sorted(s / 1000 for s in samples)
    return {"p50_us": round(statistics.median(us), 2),
            "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 2)}


def _tcp_state() -> core.TcpState:
    """A TCP state as a host captures it at a handoff (addresses, numbers,
    the request bytes it read), without a socket."""
    st = core.TcpState()
    st.c.local.family = st.c.remote.family = socket.AF_INET
    ffi.memmove(st.c.local.addr, socket.inet_aton("198.18.0.2"), 4)
    ffi.memmove(st.c.remote.addr, socket.inet_aton("198.18.0.1"), 4)
    st.c.local.port, st.c.remote.port = 443, 40000
    st.c.snd_seq, st.c.rcv_seq, st.c.mss_clamp = 1000, 2000, 1448
    st.app_data = b"GET /small.bin HTTP/1.1\r\nHost: xo\r\n\r\n"
    return st


def _derive(version: int, cipher: int) -> Callable[[Any], int]:
    hash_len = 48 if cipher == core.TLS_AES_GCM_256 else 32
    a, b = os.urandom(hash_len), os.urandom(hash_len)
    master, cr, sr = os.urandom(48), os.urandom(32), os.urandom(32)
    if version == core.TLS_1_3:
        return lambda out: lib.xo_tls13_state(cipher, a, b, hash_len, 1, 0, 0, out)
    return lambda out: lib.xo_tls12_state(cipher, master, 48, cr, sr, 1, 1, 1, out)


def _ktls_available() -> dict[str, Any]:
    """Whether kernel TLS restore could be timed here. Not timed by this
    bench (it needs a restored socket per sample; the full-kernel lane's
    tests cover kTLS restore): reported so the table says why it is empty."""
    if lib.xo_tls_kernel_available() == 1:
        return {"available": True, "reason": "kernel TLS present; not timed by this bench"}
    return {"available": False,
            "reason": ffi.string(lib.xo_last_error()).decode(errors="replace")}


def measure(version: int, cipher: int, iterations: int) -> dict[str, Any]:
    tls = ffi.new("struct xo_tls_state *")
    derive = _derive(version, cipher)
    core.raise_for(derive(tls))
    derive_ns = _time(lambda: core.raise_for(derive(tls)), iterations)

    plain = _tcp_state()
    with_tls = _tcp_state()
    core.raise_for(lib.xo_state_set_tls(with_tls.c, tls))
    sizes = {}
    encoded = {}
    enc_ns = {}
    dec_ns = {}
    for name, st in (("plain", plain), ("tls", with_tls)):
        size = lib.xo_state_encoded_size(st.c)
        buf = ffi.new("uint8_t[]", size)
        sizes[name] = size

        def enc(st: core.TcpState = st, buf: Any = buf, size: int = size) -> None:
            core.raise_for(lib.xo_state_encode(st.c, buf, size))

        enc_ns[name] = _time(enc, iterations)
        enc()
        encoded[name] = buf
        out = ffi.new("struct xo_tcp_state *")

        def dec(buf: Any = buf, size: int = size, out: Any = out) -> None:
            core.raise_for(lib.xo_state_decode(buf, size, out))
            lib.xo_state_release(out)

        dec_ns[name] = _time(dec, iterations)

    rec = ffi.new("struct xo_tls_rec **")

    def user_restore() -> None:
        core.raise_for(lib.xo_tls_rec_new(tls, rec))
        lib.xo_tls_rec_free(rec[0])

    user_ns = _time(user_restore, iterations)
    enc_tls = statistics.median(enc_ns["tls"]) - statistics.median(enc_ns["plain"])
    dec_tls = statistics.median(dec_ns["tls"]) - statistics.median(dec_ns["plain"])
    ffi.memmove(tls, b"\0" * ffi.sizeof("struct xo_tls_state"), ffi.sizeof("struct xo_tls_state"))
    return {
        "version": NAMES[version], "cipher": NAMES[cipher],
        "tls_field_bytes": sizes["tls"] - sizes["plain"],
        "derive": _p(derive_ns),
        "encode_with_tls": _p(enc_ns["tls"]), "encode_without_tls": _p(enc_ns["plain"]),
        "decode_with_tls": _p(dec_ns["tls"]), "decode_without_tls": _p(dec_ns["plain"]),
        "encode_tls_part_p50_us": round(enc_tls / 1000, 2),
        "decode_tls_part_p50_us": round(dec_tls / 1000, 2),
        "restore_user": _p(user_ns),
        "restore_kernel": _ktls_available(),
    }


def run(iterations: int = 2000) -> dict[str, Any]:
    return {"iterations": iterations, "paper": PAPER,
            "cases": [measure(v, c, iterations) for v, c in CASES]}


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"TLS part of a handoff — {result['iterations']} iterations per op (µs, "
                        "p50/p99)")
    for col in ("version", "cipher", "derive", "encode (whole state)", "decode (whole state)",
                "TLS part enc/dec p50", "restore: record layer", "restore: kTLS", "bytes"):
        table.add_column(col)
    for r in result["cases"]:
        k = r["restore_kernel"]
        table.add_row(
            r["version"], r["cipher"],
            f"{r['derive']['p50_us']}/{r['derive']['p99_us']}",
            f"{r['encode_with_tls']['p50_us']}/{r['encode_with_tls']['p99_us']}",
            f"{r['decode_with_tls']['p50_us']}/{r['decode_with_tls']['p99_us']}",
            f"{r['encode_tls_part_p50_us']}/{r['decode_tls_part_p50_us']}",
            f"{r['restore_user']['p50_us']}/{r['restore_user']['p99_us']}",
            "not timed",
            str(r["tls_field_bytes"]))
    console = Console(width=160)
    console.print(table)
    console.print(f"paper (APNet'25 Table 3, TLS): serialize {PAPER['serialize_us']} µs, "
                  f"restore {PAPER['restore_us']} µs")
    k = result["cases"][0]["restore_kernel"]
    console.print(f"kTLS restore not measured: {k['reason']}")
