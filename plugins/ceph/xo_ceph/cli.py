"""``xo ceph vstart|stop|status|deploy`` (registered on the xo command by xo.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_DIR = "/tmp/xo-ceph"


def _vstart(args: argparse.Namespace) -> int:
    from xo.ceph import cluster

    layout = "lab" if args.lab else "loopback"
    xo = args.xo if args.xo is not None else bool(args.lab)
    state = cluster.vstart(args.dir, osds=args.osds, layout=layout, lab=args.lab or "",
                           rgws=args.rgws, objectstore=args.objectstore, xo=xo,
                           threshold=args.threshold, force=args.force,
                           tls_cert=args.tls_cert or "", tls_key=args.tls_key or "",
                           progress=lambda s: print(f"[xo ceph] {s}", file=sys.stderr,
                                                    flush=True))
    _print_summary(cluster.status(state.workdir), args.json)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from xo.ceph import cluster

    killed = cluster.stop(args.dir)
    if killed:
        print(f"stopped; needed SIGKILL: {', '.join(killed)}")
    else:
        print("stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    from xo.ceph import cluster

    st = cluster.status(args.dir)
    _print_summary(st, args.json)
    return 0 if all(p["alive"] for p in st["processes"].values()) else 1


def _print_summary(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(st, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Ceph cluster in {st['workdir']} ({st['layout']}"
                        + (f", lab {st['lab']}" if st["lab"] else "") + ")")
    for col in ("process", "pid", "alive", "netns", "log"):
        table.add_column(col)
    for name, p in st["processes"].items():
        table.add_row(name, str(p["pid"]), "yes" if p["alive"] else "NO", p["netns"] or "-",
                      p["log"])
    console = Console()
    console.print(table)
    ceph = st.get("ceph")
    if ceph:
        health = ceph.get("health", {}).get("status", "?")
        osdmap = ceph.get("osdmap", {})
        pgs = ceph.get("pgmap", {})
        console.print(f"health {health}; osds {osdmap.get('num_up_osds')}/"
                      f"{osdmap.get('num_osds')} up, {osdmap.get('num_in_osds')} in; "
                      f"{pgs.get('num_pgs')} pgs")
    elif "ceph_error" in st:
        console.print(f"ceph: {st['ceph_error']}")
    console.print(f"radosgw: {', '.join(st['rgw'])}")
    if st.get("front"):
        console.print(f"XO front (S3): {st['front']}")
    if st.get("front_https"):
        console.print(f"XO front (S3 over HTTPS): {st['front_https']}")
    for uid, user in st["users"].items():
        console.print(f"S3 user {uid}: access key {user['access_key']} secret "
                      f"{user['secret_key']}")
    console.print(f"credentials: {st['workdir']}/s3-credentials.json")


def _deploy(args: argparse.Namespace) -> int:
    from xo.ceph import deploy

    written = deploy.write(args)
    for path in written:
        print(path)
    if args.tls_cert and args.role in ("front", "both"):
        print(f"front: HTTPS on {args.tls_listen} with {args.tls_cert} (install the "
              f"certificate chain and its key there; see INSTALL.txt)")
    if args.no_agent_tls:
        print("agents: TLS connections refused (the front serves them itself)")
    return 0


def add_ceph_commands(sub: Any) -> None:
    ceph = sub.add_parser("ceph", help="XO for Ceph: a cluster, the RGW front, OSD agents")
    csub = ceph.add_subparsers(dest="ceph", required=True)
    vs = csub.add_parser("vstart", help="bring up a Ceph cluster (loopback or on a lab)")
    vs.add_argument("--dir", default=DEFAULT_DIR, help=f"working directory (default "
                                                         f"{DEFAULT_DIR}); wiped first")
    vs.add_argument("--osds", type=int, default=3)
    vs.add_argument("--lab", help="an `xo lab` name: one OSD and radosgw per target host, "
                                  "mon/mgr/front on the host")
    vs.add_argument("--rgws", type=int, default=1, help="radosgw instances (loopback)")
    vs.add_argument("--objectstore", default="memstore", choices=["memstore", "bluestore"])
    vs.add_argument("--xo", dest="xo", action="store_true", default=None,
                    help="start the XO front and agents (default with --lab)")
    vs.add_argument("--no-xo", dest="xo", action="store_false")
    vs.add_argument("--threshold", type=int, default=1 << 20,
                    help="front: offload GETs of objects at least this big (bytes)")
    vs.add_argument("--force", action="store_true", help="stop a cluster running in --dir")
    vs.add_argument("--tls-cert", help="front: HTTPS certificate chain (PEM); port "
                    "8443 beside the plain one")
    vs.add_argument("--tls-key", help="front: the certificate's private key (PEM)")
    vs.add_argument("--json", action="store_true")
    vs.set_defaults(func=_vstart)
    st = csub.add_parser("status", help="processes, health, endpoints, S3 keys")
    st.add_argument("--dir", default=DEFAULT_DIR)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)
    sp = csub.add_parser("stop", help="stop every process the cluster started")
    sp.add_argument("--dir", default=DEFAULT_DIR)
    sp.set_defaults(func=_stop)
    dp = csub.add_parser("deploy", help="write systemd units and the config file")
    dp.add_argument("--out", required=True, help="directory to write into")
    dp.add_argument("--role", choices=["front", "agent", "both"], default="both")
    dp.add_argument("--ceph-conf", default="/etc/ceph/ceph.conf")
    dp.add_argument("--key", default="/etc/xo/cluster.key",
                    help="cluster key path (created 0600 under --out if --new-key)")
    dp.add_argument("--new-key", action="store_true", help="write a fresh cluster key")
    dp.add_argument("--interface", required=True, help="the interface clients arrive on")
    dp.add_argument("--listen", default="0.0.0.0:8080", help="front: S3 endpoint")
    dp.add_argument("--rgw", default="127.0.0.1:7480", help="local radosgw")
    dp.add_argument("--threshold", type=int, default=1 << 20)
    dp.add_argument("--tls-cert", default="", help="front: HTTPS certificate chain (PEM), "
                    "as installed on the front host")
    dp.add_argument("--tls-key", default="", help="front: its private key (PEM)")
    dp.add_argument("--tls-listen", default="0.0.0.0:8443", help="front: HTTPS endpoint "
                    "(with --tls-cert and --tls-key)")
    dp.add_argument("--no-agent-tls", action="store_true",
                    help="agent: refuse TLS connections (the front serves them itself)")
    dp.add_argument("--hosts", default="", help="agent: the fronts' addresses, comma-separated")
    dp.add_argument("--osds", default="", help="agent: OSD ids on this host, comma-separated")
    dp.add_argument("--python", default=sys.executable, help="interpreter with xo installed")
    dp.set_defaults(func=_deploy)
