"""``xo ceph deploy``: what an operator installs on real hosts to run XO for
Ceph: one config file (xo-ceph.toml), the cluster key, and systemd units for
the front (on the RGW host) and one agent per OSD (on each OSD host).

The units run the same entry points ``xo ceph vstart`` starts in the lab:
``python -m xo.ceph.front`` and ``python -m xo.ceph.agent --osd N``. Both need
CAP_NET_ADMIN and CAP_BPF (TCP_REPAIR, steering programs) and CAP_SYS_ADMIN
for the bpffs they pin their maps in; the units run them as root with those
capabilities bounded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xo.ceph.config import AgentConfig, ConfigError, FrontConfig, XoCephConfig, _hostport, render
from xo.engine import write_key

CAPS = "CAP_NET_ADMIN CAP_NET_RAW CAP_BPF CAP_PERFMON CAP_SYS_ADMIN CAP_SYS_RESOURCE"


def unit(entry: str, description: str, after: str, *, python: str, config: str, docs: str,
         options: str = "", binds_to: str = "") -> str:
    """A systemd service running ``python -m xo.ceph.ENTRY --config CONFIG
    OPTIONS`` as root with the CAPS bounded, started after the units in
    ``after``; binds_to: a unit it lives and dies with."""
    binds = f"BindsTo={binds_to}\n" if binds_to else ""
    return f"""[Unit]
Description={description}
Documentation=file://{docs}
After=network-online.target {after}
Wants=network-online.target
{binds}
[Service]
Type=simple
ExecStart={python} -m xo.ceph.{entry} --config {config}{options}
Restart=on-failure
RestartSec=1
CapabilityBoundingSet={CAPS}
AmbientCapabilities={CAPS}
LimitMEMLOCK=infinity
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"""


def write(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out)
    roles = {"front", "agent"} if args.role == "both" else {args.role}
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if "agent" in roles and not hosts:
        raise ConfigError("an agent needs --hosts: the fronts' addresses")
    osds = [o.strip() for o in args.osds.split(",") if o.strip()]
    for osd in osds:
        if not osd.isdigit():
            raise ConfigError(f"--osds: {osd!r} is not an OSD id")
    if args.threshold < 0:
        raise ConfigError("--threshold must be >= 0")
    rgw = _hostport(args.rgw, "--rgw")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    if args.tls_cert and "front" not in roles:
        raise ConfigError("--tls-cert is for the front (--role front or both)")
    cfg = XoCephConfig(ceph_conf=args.ceph_conf, key=args.key)
    if "front" in roles:
        cfg.front = FrontConfig(args.interface, _hostport(args.listen, "--listen"), rgw,
                                args.threshold, "/run/xo/ceph-front.json")
        if args.tls_cert:
            cfg.front.tls_listen = _hostport(args.tls_listen, "--tls-listen")
            cfg.front.tls_cert, cfg.front.tls_key = args.tls_cert, args.tls_key
    if "agent" in roles:
        cfg.agent = AgentConfig(args.interface, rgw, hosts, tls=not args.no_agent_tls)
    out.mkdir(parents=True, exist_ok=True)  # only once the input is known good
    config_path = out / "xo-ceph.toml"
    config_path.write_text(render(cfg))
    written = [config_path]
    installed_config = "/etc/xo/xo-ceph.toml"
    docs = "/usr/share/doc/xo/ceph.md"
    if args.new_key:
        key = out / "cluster.key"
        write_key(key)
        written.append(key)
    where = {"python": args.python, "config": installed_config, "docs": docs}
    if "front" in roles:
        path = out / "xo-ceph-front.service"
        path.write_text(unit("front", "XO front for Ceph RGW (hands S3 GETs to the OSD hosts)",
                             "ceph-radosgw.target", **where))
        written.append(path)
    if "agent" in roles:
        path = out / "xo-ceph-agent@.service"
        path.write_text(unit("agent", "XO agent beside Ceph OSD %i (serves handed-over S3 GETs)",
                             "ceph-osd@%i.service ceph-radosgw.target", options=" --osd %i",
                             binds_to="ceph-osd@%i.service", **where))
        written.append(path)
    lines = ["# install (as root):",
             "install -D -m 0644 xo-ceph.toml /etc/xo/xo-ceph.toml",
             f"install -D -m 0600 cluster.key {args.key}  # the same key on every host"]
    if cfg.front is not None and cfg.front.tls_listen is not None:
        lines += [f"install -D -m 0644 front.pem {cfg.front.tls_cert}  # front: HTTPS "
                  "certificate chain",
                  f"install -D -m 0600 front.key {cfg.front.tls_key}  # front: its key"]
    lines += ["install -m 0644 xo-ceph-*.service /etc/systemd/system/",
              "systemctl daemon-reload"]
    if "front" in roles:
        lines.append("systemctl enable --now xo-ceph-front.service")
    lines += [f"systemctl enable --now xo-ceph-agent@{o}.service" for o in osds]
    readme = out / "INSTALL.txt"
    readme.write_text("\n".join(lines) + "\n")
    written.append(readme)
    return written
