"""How `xo bench http` folds several rounds into one report: medians per
cell, and ratios to the proxy taken round by round (each XO run against
the proxy run of its own round). The runs here are written by hand; the
benchmark's measuring part needs the full lab and is run by `xo bench http`."""

from __future__ import annotations

from typing import Any

from xo import bench_http


def run_row(mode: str, rnd: int, mbit_s: float, cpu_per_gb: float,
            errors: int = 0) -> dict[str, Any]:
    return {"mode": mode, "size": "1MiB", "bytes": 1 << 20, "round": rnd,
            "requests": 100, "rps": mbit_s / 8.4, "mbit_s": mbit_s, "p50_ms": 10.0 + rnd,
            "p99_ms": 20.0 + rnd, "front_cpu_s": cpu_per_gb / 10,
            "front_cpu_s_per_gb": cpu_per_gb, "non_2xx": errors, "socket_errors": 0}


def test_ratios_are_paired_by_round_then_the_median_taken() -> None:
    # The load doubles the front's CPU per GB in round 1: both modes feel it.
    runs = [run_row("proxy", 0, 230, 2.0), run_row("xo", 0, 950, 0.3),
            run_row("proxy", 1, 220, 4.0), run_row("xo", 1, 940, 0.7),
            run_row("proxy", 2, 225, 2.2), run_row("xo", 2, 960, 0.33)]
    xo = bench_http._median_row(runs, "xo", "1MiB")
    assert xo["rounds"] == 3
    assert xo["mbit_s"] == 950
    assert xo["front_cpu_s_per_gb"] == 0.33
    # Per round 0.15, 0.175, 0.15: median 0.15. The ratio of the medians
    # (0.33 / 2.2) would be the same here only by chance; the paired one is
    # what the verdict reads.
    assert xo["cpu_x_proxy_each_round"] == [0.15, 0.175, 0.15]
    assert xo["cpu_x_proxy"] == 0.15
    assert xo["x_proxy"] == round(sorted([950 / 230, 940 / 220, 960 / 225])[1], 3)
    assert xo["requests"] == 300


def test_the_verdict_reads_the_paired_ratios_and_every_run_for_errors() -> None:
    runs = [run_row(m, r, 230 if m == "proxy" else 950, 2.0 if m == "proxy" else 0.5)
            for r in range(2) for m in bench_http.MODES]
    runs[-1]["non_2xx"] = 1  # one failed request in one run of one mode
    result = {"runs": runs, "steps": {},
              "rows": [bench_http._median_row(runs, m, "1MiB") for m in bench_http.MODES]}
    v = bench_http.verdict(result)
    assert v[f"front_cpu_per_gb_<={bench_http.CPU_PER_GB_X}x_proxy_at_1MiB+"] is False  # 0.25x
    assert v[f"xo_throughput_>={bench_http.XO_THROUGHPUT_X}x_proxy_at_1MiB+"] is True
    assert v["no_errors"] is False
    for run in runs:
        if run["mode"] == "xo":
            run["front_cpu_s_per_gb"] = 0.3
    runs[-1]["non_2xx"] = 0
    result["rows"] = [bench_http._median_row(runs, m, "1MiB") for m in bench_http.MODES]
    v = bench_http.verdict(result)
    assert v[f"front_cpu_per_gb_<={bench_http.CPU_PER_GB_X}x_proxy_at_1MiB+"] is True  # 0.15x
    assert v["no_errors"] is True
