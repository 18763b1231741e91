"""The ``xo`` command: doctor, lab, nginx, bench."""

from __future__ import annotations

import argparse
import signal
import sys


class MissingPartError(Exception):
    """An optional part of XO is not installed; the message says what to do."""


def require_bench_extra(command: str) -> None:
    """Fail before any work when the `bench` extra (matplotlib) is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingPartError(
            f"`xo bench {command}` draws its figure with matplotlib, which is not "
            f"installed ({exc}); install the bench extra: pip install -e '.[bench]' "
            f"in the repository (ci/install.sh does)") from exc


def _doctor(args: argparse.Namespace) -> int:
    from xo import doctor

    return doctor.main(as_json=args.json)


def _lab_demo(args: argparse.Namespace) -> int:
    from xo import demo

    return demo.main(args)


def _lab_name(value: str) -> str:
    from xo import lab

    try:
        return lab.validate_lab_name(value)
    except lab.LabError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not at least 1")
    return number


def _bench_core(args: argparse.Namespace) -> int:
    from xo import bench_core

    return bench_core.main(args.iterations, args.json)


def _bench_handoff(args: argparse.Namespace) -> int:
    require_bench_extra("handoff")
    from xo import bench_handoff

    return bench_handoff.main(args.handoffs, args.json, tls=args.tls)


def _bench_lab(args: argparse.Namespace) -> int:
    require_bench_extra("lab")
    from xo import bench_lab

    return bench_lab.main(args.targets, args.rate, args.connections, args.seconds, args.json)


def _bench_latency(args: argparse.Namespace) -> int:
    require_bench_extra("latency")
    from xo import bench_latency

    return bench_latency.main(args.requests, args.rate, args.driver, args.json)


def _bench_s3(args: argparse.Namespace) -> int:
    require_bench_extra("s3")
    import shutil

    if args.client == "wrk" and shutil.which("wrk") is None:
        raise MissingPartError("`xo bench s3 --client wrk` needs wrk (apt-get install wrk; "
                               "ci/install.sh does), or use --client boto3")
    from xo.ceph import bench

    return bench.main(args)


def _bench_http(args: argparse.Namespace) -> int:
    require_bench_extra("http")
    from xo import bench_http

    return bench_http.main(args.rate, args.seconds, args.connections, args.threshold,
                           args.build, args.json, args.sizes.split(",") if args.sizes else None,
                           args.rounds)


def _bench_rules(args: argparse.Namespace) -> int:
    from xo import bench_rules, results

    results.save(bench_rules.run(args.count, flower_count=args.flower_count,
                                 tc_count=args.tc_count), args.json, "bench-rules")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xo", description="Remote TCP connection offload")
    sub = parser.add_subparsers(dest="command", required=True)

    doc = sub.add_parser("doctor", help="what this kernel lets XO do")
    doc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    doc.set_defaults(func=_doctor)

    from xo import lab

    lab_commands = lab.add_lab_commands(sub)
    demo = lab_commands.add_parser("demo", help="bring up the lab and run the handoff demo")
    demo.add_argument("--targets", type=int, default=2)
    demo.add_argument("--requests", type=int, default=20)
    demo.add_argument("--name", type=_lab_name, default="demo",
                      help="lab name (namespaces xo-NAME-*); default demo")
    demo.set_defaults(func=_lab_demo)

    try:
        from xo.ceph.cli import add_ceph_commands
    except ImportError:  # the Ceph plugin is not installed with this package
        pass
    else:
        add_ceph_commands(sub)

    from xo import nginx

    nginx.add_commands(sub)

    bench = sub.add_parser("bench", help="benchmarks that print numbers (and JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    core = bench_sub.add_parser("core", help="capture/restore cost of one connection")
    core.add_argument("--iterations", type=int, default=2000)
    core.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    core.set_defaults(func=_bench_core)
    handoff = bench_sub.add_parser("handoff", help="handoff latency per protocol step (lab)")
    handoff.add_argument("--handoffs", type=int, default=2000)
    handoff.add_argument("--json", metavar="PATH", help="JSON path (default results/)")
    handoff.add_argument("--tls", action="store_true",
                         help="add the TLS rows: serialize and restore of a TLS record state")
    handoff.set_defaults(func=_bench_handoff)
    blab = bench_sub.add_parser("lab", help="XO vs proxying through the host, rate-limited lab")
    blab.add_argument("--targets", type=int, default=2)
    blab.add_argument("--rate", default="200mbit", help="host and target link rate")
    blab.add_argument("--connections", type=int, default=8)
    blab.add_argument("--seconds", type=float, default=5.0)
    blab.add_argument("--json", metavar="PATH", help="JSON path (default results/)")
    blab.set_defaults(func=_bench_lab)
    lat = bench_sub.add_parser("latency",
                               help="keep-alive request latency, XO vs proxy, resends counted")
    lat.add_argument("--requests", type=int, default=1000, help="per mode and object size")
    lat.add_argument("--rate", default=None, help="host and target link rate (default: none)")
    lat.add_argument("--driver", default="py", choices=["py", "c"], help="XO's driver")
    lat.add_argument("--json", metavar="PATH", help="JSON path (default results/)")
    lat.set_defaults(func=_bench_latency)
    s3 = bench_sub.add_parser("s3", help="S3 GETs: stock radosgw vs the XO front (Ceph, lab)")
    s3.add_argument("--osds", type=int, default=3, help="OSD hosts (one OSD each)")
    s3.add_argument("--rate", default="500mbit", help="front and OSD host link rate")
    s3.add_argument("--sizes", default="4k,256k,1m,4m,16m,64m",
                    help="object sizes, comma-separated (k, m suffixes)")
    s3.add_argument("--objects", type=int, default=16, help="objects per size")
    s3.add_argument("--concurrency", type=int, default=8, help="client connections")
    s3.add_argument("--seconds", type=float, default=5.0, help="per size and mode")
    s3.add_argument("--dist", choices=["uniform", "zipf"], default="uniform",
                    help="key choice: uniform, or Zipf with exponent --zipf")
    s3.add_argument("--client", choices=["wrk", "boto3"], default="wrk",
                    help="load generator: wrk (presigned URLs) or boto3 (sha256 of every body)")
    s3.add_argument("--pool", choices=["replicated", "ec"], default="replicated",
                    help="data pool of the bench bucket (ec: k=2, m=1)")
    s3.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent")
    s3.add_argument("--threshold", type=int, default=1 << 20,
                    help="XO front: offload GETs of objects at least this big")
    s3.add_argument("--json", metavar="PATH", help="JSON path (default results/)")
    s3.set_defaults(func=_bench_s3)
    http = bench_sub.add_parser("http", help="nginx: XO vs proxy_pass, wrk, 4 targets")
    http.add_argument("--rate", default="250mbit",
                      help="front and target link rate; the client's is 4x (default 250mbit)")
    http.add_argument("--seconds", type=float, default=5.0, help="wrk run per mode and size")
    http.add_argument("--connections", type=int, default=16, help="wrk connections")
    http.add_argument("--threshold", default="256k",
                      help="xo_threshold of the xo+threshold mode (default 256k)")
    http.add_argument("--build", default="dynamic", choices=["dynamic", "static"])
    http.add_argument("--sizes", help="comma-separated subset of 8KiB,64KiB,256KiB,1MiB,4MiB")
    http.add_argument("--rounds", type=_positive_int, default=1,
                      help="run every mode and size this many times; report medians")
    http.add_argument("--json", metavar="PATH", help="JSON path (default results/)")
    http.set_defaults(func=_bench_http)
    rules = bench_sub.add_parser("rules", help="steering rule insert/remove cost")
    rules.add_argument("--count", type=int, default=10000)
    rules.add_argument("--flower-count", type=int, default=1000,
                       help="tc-flower insert/remove pairs through the core (0: skip)")
    rules.add_argument("--tc-count", type=int, default=100,
                       help="the same with one tc process per rule")
    rules.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    rules.set_defaults(func=_bench_rules)
    return parser


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    from xo.core import XoError
    from xo.lab import LabError
    from xo.nginx import NginxBuildError

    try:
        from xo.ceph.cluster import CephError
        from xo.ceph.config import ConfigError
    except ImportError:
        CephError = ConfigError = XoError  # type: ignore[misc,assignment]  # noqa: N806

    args = build_parser().parse_args(argv)
    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so labs and the
    # processes started in them are torn down by their context managers.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except (XoError, LabError, CephError, ConfigError, NginxBuildError) as exc:
        print(f"xo: {exc}", file=sys.stderr)
        return 1
    except MissingPartError as exc:
        print(f"xo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
