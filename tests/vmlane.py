"""The full-kernel lane: run one command inside Debian's 6.1 kernel under QEMU.

The machine XO is developed on runs a kernel without tc-flower, act_pedit,
act_gact and kTLS, and cannot load modules. Debian's packaged
``linux-image-6.1.*-amd64`` has all of them as modules. This helper boots
that kernel under QEMU (TCG: nested KVM is not available here) with

* the host's root filesystem shared read-only over 9p (tag ``xoroot``),
* the project directory shared read-write at the same path (``xoproj``),
* a busybox initramfs whose ``/init`` loads the 9p modules, mounts both
  shares, points ``/proc/sys/kernel/modprobe`` at a wrapper that runs the
  host's modprobe on the unpacked kernel's modules, runs the command in a
  chroot of the host root, prints its exit status and powers off.

The kernel package is fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` (never installed) into a cache directory
(``/var/cache/xo-vmlane`` unless ``XO_VMLANE_CACHE`` says otherwise),
together with the extracted vmlinux (booted as PVH) and the initramfs.

    python tests/vmlane.py prepare            fetch and unpack (cached)
    python tests/vmlane.py run [-t SEC] CMD   run CMD (sh -c) in the guest,
                                              exit with its status

Every process start in the guest costs about a second (TCG), so callers
batch their work into one command (the pytest hook in conftest.py runs all
``fullkernel`` tests in one pytest process).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import lzma
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XO_VMLANE_CACHE", "/var/cache/xo-vmlane"))
KERNEL_PKG_RE = re.compile(r"^linux-image-(6\.1\.0-(\d+)-amd64)$")
EXIT_MARK = "XO-VMLANE-EXIT="
# Modules /init loads before it can reach the host's files.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
DEFAULT_TIMEOUT = 360.0


class LaneUnavailable(RuntimeError):
    """QEMU (or the kernel package) cannot be had on this machine at all."""


class LaneError(RuntimeError):
    """The lane was set up but the guest did not report an exit status."""


@dataclass(frozen=True)
class Kernel:
    release: str        # e.g. 6.1.0-50-amd64
    root: Path          # the unpacked package (boot/, lib/modules/)
    vmlinux: Path       # uncompressed ELF, booted as PVH
    initramfs: Path


def log(msg: str) -> None:
    print(f"[xo vmlane] {msg}", file=sys.stderr, flush=True)


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    res = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise LaneError(f"{' '.join(map(str, argv))}: exit {res.returncode}: "
                        f"{res.stderr.strip()[-2000:]}")
    return res.stdout


@contextmanager
def cache_lock() -> Iterator[None]:
    """One preparer at a time (several worktrees share the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---- preparing the kernel -----------------------------------------------------------


def qemu_binary() -> str:
    name = os.environ.get("XO_VMLANE_QEMU", "qemu-system-x86_64")
    path = shutil.which(name)
    if not path:
        raise LaneUnavailable(f"{name} is not installed (apt package qemu-system-x86; "
                              "ci/install.sh installs it)")
    return path


def newest_kernel_release() -> str:
    """6.1.0-N-amd64 of the newest linux-image-6.1.0-N-amd64 apt knows
    (after one `apt-get update` if it knows none)."""
    for attempt in range(2):
        if attempt:
            log("apt knows no linux-image-6.1.0-*-amd64: apt-get update")
            run("apt-get", "update", "-qq")
        out = run("apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$")
        best: tuple[int, str] | None = None
        for line in out.splitlines():
            m = KERNEL_PKG_RE.match(line.split(" ", 1)[0])
            if m and (best is None or int(m.group(2)) > best[0]):
                best = (int(m.group(2)), m.group(1))
        if best is not None:
            return best[1]
    raise LaneError("apt knows no linux-image-6.1.0-*-amd64 package, even after "
                    "apt-get update (is Debian 12's main component in sources?)")


def cached_releases() -> list[str]:
    return sorted((p.parent.name for p in CACHE.glob("6.1.0-*-amd64/ready")),
                  key=lambda r: int(r.split("-")[1]))


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Find the compressed kernel inside a bzImage and decompress it.

    The bzImage is a boot stub plus the payload compressed with one of the
    kernel's algorithms; Debian's 6.1 uses xz. Like the kernel's own
    scripts/extract-vmlinux: try every place the format's magic occurs and
    keep the first that decompresses to an ELF file.
    """
    data = vmlinuz.read_bytes()
    magic = b"\xfd7zXZ\x00"
    pos = data.find(magic)
    while pos >= 0:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = dec.decompress(data[pos:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(elf)
            tmp.replace(out)
            return
        pos = data.find(magic, pos + 1)
    raise LaneError(f"{vmlinuz}: no xz-compressed ELF kernel inside")


INIT_SCRIPT = r"""#!/bin/busybox sh
# /init of the XO lane's initramfs (written by tests/vmlane.py).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "xo-vmlane init: $*"; echo "@EXIT@125"; reboot -f; }
while read -r mod; do
	insmod "/mods/$mod" || fail "insmod $mod"
done < /mods/order
R=/newroot
mkdir -p $R
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro xoroot $R ||
	fail "mount the host root"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
for d in /run /tmp /var/tmp /dev/shm /root; do mount -t tmpfs tmpfs "$R$d"; done
# After the tmpfs mounts: a project under /tmp (a CI clone) stays visible.
mkdir -p "$R$xo_proj" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose xoproj "$R$xo_proj" ||
	fail "mount the project directory $xo_proj"
mount -t bpf bpf $R/sys/fs/bpf
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
# Module requests from the kernel (tc loading cls_flower, ...) run this
# wrapper, which runs the host's modprobe on the unpacked package.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot %s /sbin/modprobe -d %s "$@"\n' \
	"$R" "$xo_modroot" > /bin/xo-modprobe
chmod 755 /bin/xo-modprobe
echo /bin/xo-modprobe > /proc/sys/kernel/modprobe
hostname xo-vmlane
/bin/busybox chroot $R /usr/bin/env -i \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	HOME=/root TERM=dumb LANG=C.UTF-8 XO_VMLANE_GUEST=1 \
	/bin/sh -c 'cd "$1" && exec /bin/sh "$2"' xo-lane "$xo_proj" "$xo_run" < /dev/console
rc=$?
sync
echo "@EXIT@$rc"
reboot -f
"""


def build_initramfs(root: Path, release: str, out: Path) -> None:
    """busybox, /init and the modules /init loads, as a newc cpio archive."""
    tree = out.parent / "initramfs.d"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "mods", "newroot"):
        (tree / d).mkdir(parents=True)
    busybox = Path("/bin/busybox")
    if not busybox.exists() or b"/ld-linux" in busybox.read_bytes()[:4096]:
        raise LaneError("no static /bin/busybox (apt package busybox-static; "
                        "ci/install.sh installs it)")
    shutil.copy2(busybox, tree / "bin/busybox")
    # modprobe prints the insmod lines in dependency order.
    lines = run("modprobe", "-d", root, "-S", release, "--show-depends", "-a", *BOOT_MODULES)
    order: list[str] = []
    for line in lines.splitlines():
        parts = line.split()
        if parts[:1] != ["insmod"]:
            continue  # "builtin virtio_pci"
        ko = Path(parts[1])
        if ko.name not in order:
            shutil.copy2(ko, tree / "mods" / ko.name)
            order.append(ko.name)
    (tree / "mods/order").write_text("".join(f"{n}\n" for n in order))
    init = tree / "init"
    init.write_text(INIT_SCRIPT.replace("@EXIT@", EXIT_MARK))
    init.chmod(0o755)
    files = run("find", ".", "-print0", cwd=tree)
    with open(out.with_suffix(".tmp"), "wb") as f:
        subprocess.run(["cpio", "--quiet", "-o", "-0", "-H", "newc"], input=files.encode(),
                       cwd=tree, stdout=f, check=True)
    out.with_suffix(".tmp").replace(out)
    shutil.rmtree(tree)


def prepare(release: str | None = None) -> Kernel:
    """Fetch, unpack and index the kernel once; later calls reuse the cache."""
    qemu_binary()
    with cache_lock():
        if release is None:
            release = os.environ.get("XO_VMLANE_KERNEL") or None
        if release is None:
            have = cached_releases()
            release = have[-1] if have else newest_kernel_release()
        kdir = CACHE / release
        # The initramfs is named after what goes into it, so a changed /init
        # is rebuilt instead of booting a stale one from the cache.
        digest = hashlib.sha256(f"{INIT_SCRIPT}{BOOT_MODULES}".encode()).hexdigest()[:12]
        k = Kernel(release, kdir / "root", kdir / "vmlinux", kdir / f"initramfs-{digest}.cpio")
        if (kdir / "ready").exists():
            if not k.initramfs.exists():
                for old in kdir.glob("initramfs-*.cpio"):
                    old.unlink()
                build_initramfs(k.root, release, k.initramfs)
            return k
        t0 = time.monotonic()
        shutil.rmtree(kdir, ignore_errors=True)
        (kdir / "dl").mkdir(parents=True)
        os.chmod(kdir / "dl", 0o777)  # apt's sandbox user writes here
        log(f"fetching linux-image-{release}")
        run("apt-get", "download", "-q", f"linux-image-{release}", cwd=kdir / "dl")
        deb = next((kdir / "dl").glob("*.deb"))
        log(f"unpacking {deb.name}")
        run("dpkg-deb", "-x", deb, k.root)
        deb.unlink()
        (kdir / "dl").rmdir()
        run("depmod", "-b", k.root, release)
        extract_vmlinux(k.root / "boot" / f"vmlinuz-{release}", k.vmlinux)
        build_initramfs(k.root, release, k.initramfs)
        (kdir / "ready").write_text(f"{time.time():.0f}\n")
        log(f"kernel {release} ready in {time.monotonic() - t0:.1f} s ({kdir})")
        return k


# ---- running the guest -------------------------------------------------------------


@dataclass
class LaneResult:
    returncode: int
    console: str
    seconds: float


def run_in_guest(command: str, *, timeout: float = DEFAULT_TIMEOUT, echo: bool = True,
                 kernel: Kernel | None = None) -> LaneResult:
    """Boot the lane, run `command` with /bin/sh in the project directory,
    return its exit status and the console text. QEMU is killed (by its
    PID) if the guest has not finished within `timeout` seconds."""
    k = kernel or prepare()
    qemu = qemu_binary()
    run_dir = PROJECT / ".cache" / "vmlane" / f"run-{os.getpid()}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True)
    script = run_dir / "run.sh"
    script.write_text(f"#!/bin/sh\n{command}\n")
    append = " ".join([
        "console=ttyS0", "loglevel=3", "panic=-1", "rdinit=/init", "mitigations=off",
        "tsc=reliable", "no_timer_check",
        f"xo_proj={PROJECT}", f"xo_run={script.relative_to(PROJECT)}",
        f"xo_modroot={k.root}",
    ])
    argv = [
        qemu, "-accel", "tcg,thread=multi,tb-size=128", "-m", "512", "-smp", "2",
        "-cpu", "max", "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-nic", "none",
        "-kernel", str(k.vmlinux), "-initrd", str(k.initramfs), "-append", append,
        "-fsdev", "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=r,mount_tag=xoroot",
        "-fsdev", f"local,id=p,path={PROJECT},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=p,mount_tag=xoproj",
    ]
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise LaneUnavailable(f"cannot start {qemu}: {exc}") from exc
    lines: list[str] = []
    rc: int | None = None

    def reader() -> None:
        nonlocal rc
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith(EXIT_MARK):
                rc = int(line[len(EXIT_MARK):])
                continue
            lines.append(line)
            if echo:
                print(line, flush=True)

    thr = threading.Thread(target=reader, daemon=True)
    thr.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # qemu's own session: only it
            proc.wait()
        thr.join(5)
        shutil.rmtree(run_dir, ignore_errors=True)
    seconds = time.monotonic() - t0
    console = "\n".join(lines)
    if timed_out:
        raise LaneError(f"guest did not finish in {timeout:.0f} s (qemu killed); console "
                        f"tail:\n{console[-3000:]}")
    if rc is None:
        if proc.returncode and not lines:
            raise LaneUnavailable(f"qemu exited with {proc.returncode} before the guest ran")
        raise LaneError(f"qemu exited ({proc.returncode}) without the guest's exit status; "
                        f"console tail:\n{console[-3000:]}")
    return LaneResult(rc, console, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmlane", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="fetch and unpack the kernel (cached)")
    r = sub.add_parser("run", help="run a shell command in the guest")
    r.add_argument("-t", "--timeout", type=float, default=DEFAULT_TIMEOUT)
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            k = prepare()
            print(k.release)
            return 0
        res = run_in_guest(shlex.join(args.command) if len(args.command) > 1
                           else " ".join(args.command), timeout=args.timeout)
        log(f"guest exit status {res.returncode} after {res.seconds:.1f} s")
        return res.returncode
    except LaneUnavailable as exc:
        log(f"unavailable: {exc}")
        return 77
    except LaneError as exc:
        log(str(exc))
        return 125


if __name__ == "__main__":
    sys.exit(main())
