"""``xo doctor``: what this machine's kernel lets XO do.

A thin presenter over the C core's probes (xo_core/src/probe.c,
xo_core/include/xo_probe.h). Each probe runs the real thing (a repair-mode
socket, a BPF map and program, a clsact qdisc with cls_bpf, an XDP program
on a veth, the TLS ULP, the flower backend's own probe) and answers ok,
missing (what that disables, what to do) or unknown (why it could not
tell). Probes that touch interfaces run in a private, unnamed network
namespace that disappears when the probe returns.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from xo._xo_cffi import ffi, lib

STATUS = {lib.XO_PROBE_OK: "ok", lib.XO_PROBE_MISSING: "missing",
          lib.XO_PROBE_UNKNOWN: "unknown"}
# Handoffs need these; everything else degrades gracefully.
REQUIRED = ("TCP_REPAIR", "BPF")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    disables: str = ""
    remedy: str = ""
    status: str = "ok"  # ok | missing | unknown


def run_probe(probe_id: int) -> Check:
    res = ffi.new("struct xo_probe_result *")
    code = lib.xo_probe_run(probe_id, res)
    if code:
        raise RuntimeError(f"xo_probe_run({probe_id}): "
                           f"{ffi.string(lib.xo_last_error()).decode()}")
    status = STATUS[res.status]
    return Check(name=ffi.string(res.name).decode(), ok=status == "ok",
                 detail=ffi.string(res.detail).decode(),
                 disables=ffi.string(res.disables).decode(),
                 remedy=ffi.string(res.remedy).decode(), status=status)


def run_checks() -> list[Check]:
    return [run_probe(i) for i in range(lib.XO_PROBE_COUNT)]


def main(as_json: bool = False) -> int:
    results = run_checks()
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        colour = {"ok": "green", "missing": "red", "unknown": "yellow"}
        table = Table(title=f"xo doctor — kernel {os.uname().release}")
        for col in ("feature", "", "detail", "if missing, disables", "what to do"):
            table.add_column(col, overflow="fold")
        for r in results:
            table.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", r.detail,
                          r.disables, r.remedy)
        Console(width=160).print(table)
    return 0 if all(r.ok for r in results if r.name in REQUIRED) else 1
