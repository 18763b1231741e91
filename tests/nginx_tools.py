"""Test helpers around xo.nginx_lab (real nginx as XO front and targets in
a lab): both builds as pytest params, the application behind the targets
(tests/body_app.py), and curl traffic that records every request."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xo.nginx_lab import (  # noqa: F401 (the tests' names)
    BUILDS,
    DYNAMIC,
    HTTP_PORT,
    PIN_ROOT,
    STATIC,
    NginxBuild,
    NginxCluster,
    NginxProc,
    WrkResult,
    wait_for,
)
from xo.nginx_lab import nginx_cluster as _nginx_cluster

BODY_APP = Path(__file__).resolve().parent / "body_app.py"


def assert_curl_client_clean(delta: dict[str, int]) -> None:
    """A curl run's client counters (client_loss_counters deltas): no reset,
    no timeout, and at most one resend. Known gap (docs/benchmarks.md,
    `xo bench latency`): curl, unlike http.client, now and then shows one
    tail-loss probe or resent segment per run; the http.client and wrk tests
    hold zero."""
    assert delta["TcpOutRsts"] == delta["TcpEstabResets"] == delta["TCPTimeouts"] == 0, delta
    assert delta["TcpRetransSegs"] <= 1 and delta["TCPLossProbes"] <= 1, delta


def assert_targets_track_nothing(c: NginxCluster) -> None:
    """Every target's machine tracks no connection once its clients are
    gone (a closed one stays tracked until the host confirms it: a round
    trip), and none was closed under a wrong id. One left tracked keeps a
    reloaded worker from ever exiting ("waits for 1 connection(s) it
    tracks")."""
    def tracked() -> dict[str, int]:
        return {t.name: int(c.status(t.name)["stats"]["active"])  # type: ignore[index]
                for t in c.testbed.targets}

    wait_for(lambda: not any(tracked().values()), "the targets to track nothing", timeout=10)
    for t in c.testbed.targets:
        assert "is not being served here" not in c.procs[t.name].log_text(), t.name


@contextlib.contextmanager
def nginx_cluster(build: NginxBuild, targets: int = 2,
                  rate: str | None = None) -> Iterator[NginxCluster]:
    """xo.nginx_lab.nginx_cluster with tests/body_app.py behind each target."""
    with _nginx_cluster(build, targets, rate, body_app=BODY_APP) as c:
        yield c


def build_params() -> list[object]:
    """pytest params over both builds, each skipped (with the reason) when
    it is not built."""
    import pytest

    return [pytest.param(b, id=b.name, marks=pytest.mark.skipif(
        b.available() is not None, reason=str(b.available()))) for b in BUILDS]


@dataclass
class Fetch:
    """One request of a Traffic client."""

    path: str
    rc: int           # curl's exit code for its whole run
    status: str
    served_by: str
    digest: str       # sha256 of the body received
    keepalive: bool
    size: int


class Traffic:
    """Clients in the client namespace fetching from the front until stopped:
    curl processes, some fetching several paths over one keep-alive
    connection (curl retries a request on a reused connection that the
    server closed before answering, as HTTP clients do), some one path per
    connection. Every request's status, server and body digest are kept."""

    def __init__(self, c: NginxCluster, paths: list[str], workdir: Path,
                 clients: int = 4, per_run: int = 6, timeout: float = 30) -> None:
        self.c, self.paths, self.workdir = c, paths, workdir
        self.clients, self.per_run, self.timeout = clients, per_run, timeout
        self.fetches: list[Fetch] = []
        self.retries = 0  # reused connections curl found closed and retried
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(clients)]
        self._lock = threading.Lock()

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def wait_for_requests(self, n: int) -> None:
        start = len(self.fetches)
        wait_for(lambda: len(self.fetches) >= start + n or bool(self.errors),
                 f"{n} more requests")

    def _client(self, i: int) -> None:

        keepalive = i % 2 == 0
        run = 0
        while not self._stop.is_set():
            run += 1
            count = self.per_run if keepalive else 1
            paths = [self.paths[(run * count + k + i) % len(self.paths)] for k in range(count)]
            outs = [self.workdir / f"c{i}-{k}" for k in range(count)]
            args: list[str] = []
            for path, out in zip(paths, outs, strict=True):
                args += ["-o", str(out), self.c.url + path]
            res = subprocess.run(["ip", "netns", "exec", self.c.testbed.client.netns, "curl",
                                  "-sS", "-v", "-m", str(int(self.timeout)), "-w",
                                  "%{http_code} %header{x-served-by}\\n", *args],
                                 capture_output=True, text=True)
            lines = res.stdout.splitlines()
            got = []
            for k, path in enumerate(paths):
                status, _, by = (lines[k] if k < len(lines) else "000 ").partition(" ")
                try:
                    data = outs[k].read_bytes()
                except FileNotFoundError:
                    data = b""
                digest = hashlib.sha256(data).hexdigest()
                got.append(Fetch(path, res.returncode, status, by, digest, keepalive, len(data)))
            with self._lock:
                self.fetches += got
                self.retries += res.stderr.count("retrying a fresh connect")
                # curl's exit code is its last transfer's; earlier ones that
                # failed say so on stderr
                if res.returncode != 0 or "curl: (" in res.stderr:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} rc {res.returncode} "
                                       + "\n".join(ln for ln in res.stderr.splitlines()
                                                   if ln.startswith(("curl:", "* ", "< HTTP",
                                                                     "< X-Served"))))
            for out in outs:
                out.unlink(missing_ok=True)


FILES = {"8k.bin": 8 << 10, "1m.bin": 1 << 20, "4m.bin": 4 << 20}


def put_random_files(c: NginxCluster, files: dict[str, int] = FILES,
                     prefix: str = "") -> dict[str, str]:
    """Random bodies of the given sizes in the cluster's docroot, readable by
    its workers; their digests by prefix + name."""
    digests = {}
    for name, size in files.items():
        body = os.urandom(size)
        (c.docroot / name).write_bytes(body)
        (c.docroot / name).chmod(0o644)
        digests[prefix + name] = hashlib.sha256(body).hexdigest()
    return digests
