"""The reference application's configuration file, shared by both drivers:
``xo.refapp`` (Python) and ``xo-driver`` (C) read the same file, one
``name value`` per line (docs/protocol.md lists them). Nothing here knows
about the lab: the lab (``xo.demo.RefAppCluster``) writes such files, and so
can an operator or a test on hosts of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("host", "target")


@dataclass
class TargetEntry:
    name: str
    ip: str      # where its control port is reached
    mac: str     # its interface's MAC (redirected frames go there)
    port: int = 0  # its control port; 0: the config's control_port


@dataclass
class AppConfig:
    role: str
    name: str
    ip4: str
    ifindex: int
    mac: str
    key: str
    docroot: str
    pin_dir: str
    bpf_object: str
    ip6: str = ""
    http_port: int = 8080
    control_port: int = 7700
    owner: int = 0
    policy: str = "least_loaded"
    timings: str = ""
    crash_at: str = ""
    redirect_ttl_ms: int = 0
    drain_timeout_ms: int = 2000
    park_ring_bytes: int = 0
    # Unread bytes from which a state goes without them, the bytes after it
    # (xo.proto.Timeouts.bytes_follow_min; 0: the core's default, 64 KiB).
    bytes_follow_min: int = 0
    # Host: GET/HEAD of a docroot file smaller than this many bytes is proxied
    # to a target, not handed off (0: hand off every request). Python app only.
    offload_min_bytes: int = 0
    targets: list[TargetEntry] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    timeouts: dict[str, int] = field(default_factory=dict)  # xo.proto.Timeouts, ms
    # Read by the Python app only (the C driver refuses other values).
    mode: str = "xo"
    ingress: str = "tc"
    move_policy: str = "none"
    lab: str = ""  # the lab to prepare for XDP ingress (xo.lab.prepare_xdp_tx)
    # host: an HTTPS listener (TLS terminated here, sessions handed off
    # with the connection; xo.tls) on tls_port (0: 8443) with this PEM
    # certificate chain and key
    tls_cert: str = ""
    tls_key: str = ""
    tls_port: int = 0
    no_tls: int = 0  # target: 1 = take no TLS sessions (the host rolls back)

    @property
    def host_port(self) -> int:
        return self.http_port

    def address(self, v6: bool) -> str:
        return self.ip6 if v6 else self.ip4

    def control_address(self, target: TargetEntry) -> tuple[str, int]:
        return target.ip, target.port or self.control_port

    def dump(self) -> str:
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "targets":
                lines += [f"target {t.name} {t.ip} {t.mac} {t.port or self.control_port}"
                          for t in value]
            elif f.name == "hosts":
                lines += [f"host {ip}" for ip in value]
            elif f.name == "timeouts":
                lines += [f"timeout {k} {v}" for k, v in value.items()]
            elif value not in ("", None) and not (f.name in _OPTIONAL_ZERO and value == 0):
                lines.append(f"{f.name} {value}")
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> Path:
        path.write_text(self.dump())
        return path

    @classmethod
    def load(cls, path: str | Path) -> AppConfig:
        values: dict[str, object] = {"targets": [], "hosts": [], "timeouts": {}}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for lineno, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, _, rest = line.partition(" ")
            args = rest.split()
            where = f"{path}:{lineno}"
            if name == "target":
                if len(args) not in (3, 4):
                    raise ValueError(f"{where}: target NAME IP MAC [PORT]")
                values["targets"].append(  # type: ignore[attr-defined]
                    TargetEntry(args[0], args[1], args[2], int(args[3]) if len(args) == 4 else 0))
            elif name == "host" and len(args) == 1:
                values["hosts"].append(args[0])  # type: ignore[attr-defined]
            elif name == "timeout" and len(args) == 2:
                values["timeouts"][args[0]] = int(args[1])  # type: ignore[index]
            elif name in types and len(args) == 1 and name not in ("targets", "hosts"):
                values[name] = int(args[0]) if types[name] == "int" else args[0]
            else:
                raise ValueError(f"{where}: unknown or malformed setting {line!r}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                   and f.name not in values]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        cfg = cls(**values)  # type: ignore[arg-type]
        if cfg.role not in ROLES:
            raise ValueError(f"{path}: role {cfg.role!r}, want host or target")
        if cfg.offload_min_bytes < 0:
            raise ValueError(f"{path}: offload_min_bytes {cfg.offload_min_bytes}: want >= 0")
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            raise ValueError(f"{path}: tls_cert and tls_key go together")
        if cfg.role == "target" and not cfg.hosts:
            raise ValueError(f"{path}: a target needs its hosts' addresses (host lines)")
        return cfg


_OPTIONAL_ZERO = {"owner", "redirect_ttl_ms", "park_ring_bytes", "bytes_follow_min",
                  "offload_min_bytes",
                  "tls_port", "no_tls"}
