"""The one configuration file of XO for Ceph (TOML), read by the front and by
every agent; ``xo ceph deploy`` and ``xo ceph vstart`` write it.

    [cluster]
    ceph_conf = "/etc/ceph/ceph.conf"     # how to reach the monitors
    key = "/etc/xo/cluster.key"           # the XO cluster key (0600, 16..64 bytes)
    control_port_offset = 1000            # agent port = OSD's public msgr2 port + this
    pin_root = "/run/xo/bpf"              # where steering maps are pinned

    [front]
    interface = "eth0"                    # where clients arrive (steering attaches here)
    listen = "0.0.0.0:8080"               # the S3 endpoint
    rgw = "127.0.0.1:7480"                # the local radosgw everything else goes to
    threshold = 1048576                   # offload GETs of objects at least this big
    stats = "/run/xo/ceph-front.json"     # counters, rewritten every half second
    tls_listen = "0.0.0.0:8443"           # HTTPS endpoint (with tls_cert and tls_key)
    tls_cert = "/etc/xo/front.pem"        # certificate chain (PEM)
    tls_key = "/etc/xo/front.key"         # its private key (PEM)

    [agent]
    interface = "eth0"                    # the OSD host's interface towards clients
    rgw = "127.0.0.1:7480"                # the radosgw on this OSD host
    hosts = ["198.18.0.2"]                # the fronts' addresses (allowed to hand over)
    tls = true                            # take TLS sessions (false: the front serves them)
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OFFSET = 1000
DEFAULT_THRESHOLD = 1 << 20
DEFAULT_TLS_PORT = 8443


class ConfigError(ValueError):
    pass


def control_port(msgr2_port: int, offset: int = DEFAULT_OFFSET) -> int:
    """The agent's control port beside an OSD: its public msgr2 port + offset
    (OSDs bind 6800-7300 by default, so 7800-8300 with the default offset)."""
    port = msgr2_port + offset
    if not 0 < port < 65536:
        raise ConfigError(f"control port {port} (msgr2 {msgr2_port} + {offset}) out of range")
    return port


def _hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what} = {text!r}: want HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class FrontConfig:
    interface: str
    listen: tuple[str, int]
    rgw: tuple[str, int]
    threshold: int = DEFAULT_THRESHOLD
    stats: str = ""
    offload: bool = True
    # HTTPS: the listener's address and the certificate chain and key (all
    # three, or none: no HTTPS listener)
    tls_listen: tuple[str, int] | None = None
    tls_cert: str = ""
    tls_key: str = ""


@dataclass
class AgentConfig:
    interface: str
    rgw: tuple[str, int]
    hosts: list[str] = field(default_factory=list)
    tls: bool = True  # take TLS sessions (continued with the core's record layer)


@dataclass
class XoCephConfig:
    ceph_conf: str
    key: str
    control_port_offset: int = DEFAULT_OFFSET
    pin_root: str = "/run/xo/bpf"
    front: FrontConfig | None = None
    agent: AgentConfig | None = None
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> XoCephConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        try:
            return cls._from(data, str(path))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: missing or wrong setting {exc}") from exc

    @classmethod
    def _from(cls, data: dict[str, Any], path: str) -> XoCephConfig:
        c = data["cluster"]
        cfg = cls(str(c["ceph_conf"]), str(c["key"]),
                  int(c.get("control_port_offset", DEFAULT_OFFSET)),
                  str(c.get("pin_root", "/run/xo/bpf")), path=path)
        if "front" in data:
            f = data["front"]
            cfg.front = FrontConfig(str(f["interface"]), _hostport(f["listen"], "listen"),
                                    _hostport(f.get("rgw", "127.0.0.1:7480"), "rgw"),
                                    int(f.get("threshold", DEFAULT_THRESHOLD)),
                                    str(f.get("stats", "")), bool(f.get("offload", True)))
            if cfg.front.threshold < 0:
                raise ConfigError(f"{path}: threshold must be >= 0")
            cert, key = str(f.get("tls_cert", "")), str(f.get("tls_key", ""))
            if bool(cert) != bool(key):
                raise ConfigError(f"{path}: [front] tls_cert and tls_key go together")
            if cert:
                cfg.front.tls_cert, cfg.front.tls_key = cert, key
                cfg.front.tls_listen = _hostport(
                    f.get("tls_listen", f"{cfg.front.listen[0]}:{DEFAULT_TLS_PORT}"),
                    "tls_listen")
            elif "tls_listen" in f:
                raise ConfigError(f"{path}: [front] tls_listen needs tls_cert and tls_key")
        if "agent" in data:
            a = data["agent"]
            cfg.agent = AgentConfig(str(a["interface"]),
                                    _hostport(a.get("rgw", "127.0.0.1:7480"), "rgw"),
                                    [str(h) for h in a.get("hosts", [])],
                                    bool(a.get("tls", True)))
            if not cfg.agent.hosts:
                raise ConfigError(f"{path}: [agent] hosts: the fronts' addresses are needed")
        return cfg


def load_for_daemon(parser: argparse.ArgumentParser, path: str, section: str,
                    log_file: str | None, log_tag: str) -> XoCephConfig:
    """The config file of a front or agent started from the command line, which
    must have `section`: a clear usage error (exit 2) otherwise. Logging goes
    to log_file (stderr when None), each line tagged with log_tag."""
    try:
        cfg = XoCephConfig.load(path)
    except ConfigError as exc:
        parser.error(str(exc))
    if getattr(cfg, section) is None:
        parser.error(f"{path}: no [{section}] section")
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=log_file, level=logging.INFO,
                        format=f"%(asctime)s {log_tag} %(name)s %(levelname)s %(message)s")
    return cfg


def _q(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_q(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render(cfg: XoCephConfig) -> str:
    out = ["[cluster]", f"ceph_conf = {_q(cfg.ceph_conf)}", f"key = {_q(cfg.key)}",
           f"control_port_offset = {cfg.control_port_offset}", f"pin_root = {_q(cfg.pin_root)}"]
    if cfg.front is not None:
        f = cfg.front
        out += ["", "[front]", f"interface = {_q(f.interface)}",
                f"listen = {_q(f'{f.listen[0]}:{f.listen[1]}')}",
                f"rgw = {_q(f'{f.rgw[0]}:{f.rgw[1]}')}", f"threshold = {f.threshold}",
                f"stats = {_q(f.stats)}", f"offload = {_q(f.offload)}"]
        if f.tls_listen is not None:
            out += [f"tls_listen = {_q(f'{f.tls_listen[0]}:{f.tls_listen[1]}')}",
                    f"tls_cert = {_q(f.tls_cert)}", f"tls_key = {_q(f.tls_key)}"]
    if cfg.agent is not None:
        a = cfg.agent
        out += ["", "[agent]", f"interface = {_q(a.interface)}",
                f"rgw = {_q(f'{a.rgw[0]}:{a.rgw[1]}')}", f"hosts = {_q(a.hosts)}",
                f"tls = {_q(a.tls)}"]
    return "\n".join(out) + "\n"
