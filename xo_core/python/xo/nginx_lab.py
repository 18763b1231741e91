"""Real nginx as XO front and targets in a lab (xo.lab): configuration files,
processes started and stopped by PID, wrk from the client namespace. Used by
the nginx integration tests (tests/nginx_tools.py) and ``xo bench http``.

The module comes from ci/build-nginx.sh (a dynamic module loaded into
Debian's /usr/sbin/nginx) or from `xo nginx build` (a static nginx built
from a patched source tree); `NginxBuild` names one of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xo.engine import write_key
from xo.lab import Lab, lab
from xo.steer import default_object_path

REPO = Path(__file__).resolve().parents[3]
DYNAMIC_SO = REPO / "plugins/nginx/build/ngx_http_xo_module.so"
STATIC_BIN = REPO / "plugins/nginx/build/static/sbin/nginx"
PIN_ROOT = Path("/run/xo/bpf")
HTTP_PORT = 8080
BODY_APP_PORT = 9000  # an application behind each target (location /post)


@dataclass(frozen=True)
class NginxBuild:
    name: str  # "dynamic" or "static"
    binary: Path
    module: Path | None  # load_module path for the dynamic build

    def available(self) -> str | None:
        """None when usable, else why not."""
        if not self.binary.exists():
            return f"{self.binary} missing"
        if self.module is not None and not self.module.exists():
            return f"{self.module} missing (bash ci/build-nginx.sh)"
        return None


DYNAMIC = NginxBuild("dynamic", Path("/usr/sbin/nginx"), DYNAMIC_SO)
STATIC = NginxBuild("static", STATIC_BIN, None)
BUILDS = [DYNAMIC, STATIC]


def world_readable_dir(tag: str) -> Path:
    """Workers run as nobody: their docroots must be readable by it."""
    root = Path(f"/tmp/xo-nginx-{tag}")
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    return root


@dataclass
class NginxProc:
    name: str
    ns: str
    conf: Path
    prefix: Path
    proc: subprocess.Popen[bytes]

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True).stdout.split()
        return [int(p) for p in out]

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.signal(signal.SIGQUIT)  # graceful
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in self.workers():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


def wait_for(cond: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout  # only turns a hang into a failure
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class NginxCluster:
    """A front nginx and target nginx processes on a lab."""

    testbed: Lab
    build: NginxBuild
    root: Path
    key: Path
    procs: dict[str, NginxProc] = field(default_factory=dict)
    apps: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: int = 1  # worker_processes of every nginx started after it is set
    docroot: Path = field(init=False)

    def __post_init__(self) -> None:
        self.docroot = self.root / "docroot"
        self.docroot.mkdir(mode=0o755, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://{self.testbed.host.ipv4}:{HTTP_PORT}"

    def common(self, member: str) -> str:
        m = self.testbed.member(member)
        load = f"load_module {self.build.module};\n" if self.build.module else ""
        prefix = self.root / member
        return f"""{load}worker_processes {self.workers};
worker_rlimit_core 500m;
{os.environ.get("XO_NGINX_EXTRA", "")}
working_directory {prefix};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log {os.environ.get("XO_NGINX_LOG", "info")};
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000;
    client_max_body_size 128m;
    xo_key {self.key};
    xo_interface {m.ifname};
    xo_bpf_object {default_object_path()};
    xo_pin_dir {PIN_ROOT}/{self.testbed.name}-{member};
"""

    def target_conf(self, member: str, extra_http: str = "", extra_server: str = "") -> str:
        m = self.testbed.member(member)
        return self.common(member) + f"""    xo_hosts {self.testbed.host.ipv4};
    {extra_http}
    server {{
        listen {m.ipv4}:{HTTP_PORT};
        root {self.docroot};
        xo_control {m.ipv4}:7700;
        add_header X-Served-By {member} always;
        location /private/ {{ deny all; }}
        location /put/ {{ dav_methods PUT; create_full_put_path on; root {self.root}/{member}; }}
        location /post {{ proxy_pass http://127.0.0.1:{BODY_APP_PORT}; }}
        location = /xo_status {{ xo_status; }}
        {extra_server}
    }}
}}
"""

    def front_conf(self, location: str = "xo_pass;", extra_http: str = "",
                   xo_targets: bool = True) -> str:
        """The front's configuration: the lab's targets as xo_target lines
        (none with xo_targets=False: extra_http then names them, e.g. in an
        upstream block)."""
        targets = "".join(f"    xo_target {t.name} {t.ipv4}:7700;\n"
                          for t in self.testbed.targets) if xo_targets else ""
        return self.common("host") + targets + f"""    {extra_http}
    server {{
        listen {self.testbed.host.ipv4}:{HTTP_PORT};
        root {self.docroot};
        add_header X-Served-By host always;
        location = /xo_status {{ xo_status; }}
        location / {{
            {location}
        }}
    }}
}}
"""

    def start(self, member: str, conf_text: str, ready: str | None = None) -> NginxProc:
        prefix = self.root / member
        prefix.mkdir(mode=0o755, exist_ok=True)
        put = prefix / "put"  # WebDAV PUTs land here; workers run as nobody
        put.mkdir(exist_ok=True)
        put.chmod(0o777)
        conf = prefix / "nginx.conf"
        conf.write_text(conf_text)
        ns = self.testbed.member(member).netns
        log = (prefix / "stderr.log").open("ab")
        # nsenter, not `ip netns exec`: only the network namespace changes,
        # so the bpffs nginx mounts for its pins is the test's too (and
        # outlives a killed nginx, as on a real machine).
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", str(self.build.binary),
                                 "-p",
                                 str(prefix), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        # nsenter execs nginx: the PID is the master's.
        p = NginxProc(member, ns, conf, prefix, proc)
        self.procs[member] = p
        wait_for(lambda: proc.poll() is not None or p.workers(), f"{member} workers")
        assert proc.poll() is None, (prefix / "stderr.log").read_text() + p.log_text()
        if ready:
            wait_for(lambda: p.log_text().count(ready) >= 1 or proc.poll() is not None,
                     f"{member}: {ready!r}")
            assert proc.poll() is None, p.log_text()[-3000:]
        return p

    body_app: Path | None = None  # a script run behind each target (start_all)

    def start_body_app(self, member: str) -> None:
        """The body_app script on 127.0.0.1 in the member's namespace."""
        ns = self.testbed.member(member).netns
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        assert self.body_app is not None
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(self.body_app),
                                 "127.0.0.1", str(BODY_APP_PORT)], stdout=subprocess.PIPE)
        self.apps.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"READY", f"body app in {member}"

    def start_all(self, front_location: str = "xo_pass;", target_http: str = "",
                  front_http: str = "") -> None:
        for t in self.testbed.targets:
            if self.body_app:
                self.start_body_app(t.name)
            self.start(t.name, self.target_conf(t.name, extra_http=target_http))
        self.start("host", self.front_conf(front_location, front_http))
        self.wait_targets_up()

    def wait_targets_up(self, names: list[str] | None = None) -> None:
        """Every (named) target's control connection up in each of the
        front's `workers` workers (their xo_status; any worker may answer
        one request, so ask until that many have said so)."""
        want = set(names or [t.name for t in self.testbed.targets])
        ready: set[int] = set()

        def up() -> bool:
            try:
                st = self.status("host")
                peers = st["peers"]
                assert isinstance(peers, list)
                if want <= {p["name"] for p in peers if p["up"]}:
                    ready.add(int(str(st["pid"])))
            except (AssertionError, ValueError, KeyError):
                return False
            # (an old worker finishing after a reload answers no request)
            return len(ready & set(self.procs["host"].workers())) >= self.workers

        wait_for(up, f"targets {sorted(want)} up")

    def status(self, member: str) -> dict[str, object]:
        """The member nginx's xo_status (its worker's counters), asked from
        inside its own namespace."""
        m = self.testbed.member(member)
        res = subprocess.run(["ip", "netns", "exec", m.netns, "curl", "-sS", "-m", "5",
                              f"http://{m.ipv4}:{HTTP_PORT}/xo_status"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    def wrk(self, path: str, connections: int = 8, seconds: float = 3,
            threads: int = 2) -> WrkResult:
        res = subprocess.run(["ip", "netns", "exec", self.testbed.client.netns, "wrk",
                              "-t", str(min(threads, connections)), "-c", str(connections),
                              "-d", f"{max(1, round(seconds))}s", "--timeout", "30s",
                              "--latency",
                              self.url + path],
                             capture_output=True, text=True, timeout=seconds + 60)
        assert res.returncode == 0, res.stdout + res.stderr
        return WrkResult.parse(res.stdout)

    def curl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.testbed.client.netns, "curl", "-sS",
                               "-m", str(int(timeout)), *args], capture_output=True, text=True)

    def start_refapp(self, member: str, role: str, bytes_follow_min: int = 0,
                     tls: tuple[Path, Path, int] | None = None) -> subprocess.Popen[bytes]:
        """The Python driver (xo.refapp, from a config file) as the member:
        a host handing requests to the lab's targets, or a target taking
        them from the lab's host. bytes_follow_min: see AppConfig; tls: a
        host's HTTPS listener (certificate, key, port), its sessions handed
        off with the connections (xo.tls)."""
        from xo.appconfig import AppConfig, TargetEntry

        m = self.testbed.member(member)
        prefix = self.root / member
        prefix.mkdir(mode=0o755, exist_ok=True)
        cfg = AppConfig(role=role, name=member, ip4=m.ipv4, ifindex=m.ifindex, mac=m.mac,
                        key=str(self.key), docroot=str(self.docroot),
                        pin_dir=f"{PIN_ROOT}/{self.testbed.name}-{member}",
                        bpf_object=str(default_object_path()), policy="round_robin",
                        bytes_follow_min=bytes_follow_min)
        if tls is not None:
            cert, key, cfg.tls_port = tls
            cfg.tls_cert, cfg.tls_key = str(cert), str(key)
        if role == "host":
            cfg.targets = [TargetEntry(t.name, t.ipv4, t.mac) for t in self.testbed.targets]
        else:
            cfg.hosts = [self.testbed.host.ipv4]
        conf = cfg.write(prefix / "refapp.conf")
        log = prefix / "refapp.log"
        proc = subprocess.Popen(["ip", "netns", "exec", m.netns, sys.executable, "-m",
                                 "xo.refapp", "--config", str(conf), "--log", str(log)],
                                stdout=subprocess.PIPE)
        self.apps.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"READY", log.read_text()[-2000:] if log.exists() else line
        return proc

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()
        for app in self.apps:
            app.terminate()
            try:
                app.wait(10)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


_SIZE = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


@dataclass
class WrkResult:
    """What wrk printed: requests done, errors, non-2xx/3xx answers, the
    latency distribution."""

    requests: int
    seconds: float
    bytes_read: float
    non_2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    text: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @classmethod
    def parse(cls, out: str) -> WrkResult:
        m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m), ([\d.]+)(B|KB|MB|GB) read",
                      out)
        assert m, out
        secs = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
        errors = {}
        e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                      r"timeout (\d+)", out)
        if e:
            errors = dict(zip(("connect", "read", "write", "timeout"),
                              map(int, e.groups()), strict=True))
        non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        lat = {f"p{p}": _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out,
                                                      re.M)}
        return cls(int(m.group(1)), secs, float(m.group(4)) * _SIZE[m.group(5)],
                   int(non.group(1)) if non else 0, errors, lat, out)


@contextlib.contextmanager
def nginx_cluster(build: NginxBuild, targets: int = 2, rate: str | None = None,
                  client_rate: str | None = None,
                  body_app: Path | None = None) -> Iterator[NginxCluster]:
    tag = secrets.token_hex(3)
    name = "n" + tag
    root = world_readable_dir(tag)
    cluster: NginxCluster | None = None
    try:
        key = root / "cluster.key"
        write_key(key)
        with lab(name, targets=targets, rate=rate, client_rate=client_rate) as testbed:
            cluster = NginxCluster(testbed, build, root, key)
            cluster.body_app = body_app
            try:
                yield cluster
            finally:
                cluster.stop()
    finally:
        for member in ("host", *(f"t{i}" for i in range(targets))):
            pins = PIN_ROOT / f"{name}-{member}"
            if pins.exists():
                subprocess.run(["umount", "-l", str(pins)], capture_output=True)
                shutil.rmtree(pins, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


