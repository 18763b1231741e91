"""Missing optional parts give one clear line, never a traceback.

Nothing here is mocked: matplotlib is made unimportable by a real import
hook in a fresh interpreter, and clang is absent from a real PATH (a
directory of links to every tool on the machine except clang*).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Namespaces of the labs `xo bench handoff` and `xo bench lab` bring up
# (xo.bench_handoff, xo.bench_lab: lab names bh<driver><4 hex>, bl<mode><4 hex>).
BENCH_LAB_NETNS = re.compile(r"^xo-b[hl][a-z]+[0-9a-f]{4}-")

BLOCK_MATPLOTLIB = """
import sys
from importlib.abc import MetaPathFinder

class NoMatplotlib(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoMatplotlib())
try:
    import matplotlib  # noqa
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the import block did not work")
from xo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["handoff", "--handoffs", "1"],
                                     ["lab", "--seconds", "0.1"]], ids=["handoff", "lab"])
def test_bench_without_matplotlib_says_what_to_install(command: list[str]) -> None:
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    out = subprocess.run([sys.executable, "-c", BLOCK_MATPLOTLIB, "bench", *command],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "matplotlib" in lines[0] and "[bench]" in lines[0] and "pip install" in lines[0]
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    # It stopped before doing any work: no lab of a benchmark came up. (Only
    # the benchmarks' own lab names count: other runs may make labs meanwhile.)
    netns_after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not [n for n in netns_after - netns_before if BENCH_LAB_NETNS.match(n)]


def path_without_clang(tmp: Path) -> str:
    """A PATH directory holding links to every tool on PATH except clang*."""
    shim = tmp / "bin-without-clang"
    shim.mkdir()
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = Path(d) / name
            link = shim / name
            if name.startswith("clang") or link.exists() or not os.access(target, os.X_OK):
                continue
            link.symlink_to(target)
    assert subprocess.run(["sh", "-c", "command -v clang"], env={"PATH": str(shim)},
                          capture_output=True).returncode != 0
    assert (shim / "make").exists() and (shim / "cc").exists()
    return str(shim)


def source_copy(tmp: Path) -> Path:
    """The repository's files as git sees them (no build products)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout
    dst = tmp / "src"
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())
    assert not (dst / "bpf" / "build").exists()
    return dst


def test_bpf_make_without_clang_says_run_install(tmp_path: Path) -> None:
    src = source_copy(tmp_path)
    out = subprocess.run(["make", "-C", str(src / "bpf")], capture_output=True, text=True,
                         env={**os.environ, "PATH": path_without_clang(tmp_path)}, timeout=60)
    assert out.returncode != 0
    assert out.stderr.splitlines()[0] == "clang not found: run ci/install.sh", out.stderr
    assert "Error 127" not in out.stderr


def test_pip_install_without_clang_says_run_install(tmp_path: Path) -> None:
    src = source_copy(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                          "--no-deps", "--no-cache-dir", "-w", str(tmp_path / "wheels"),
                          str(src)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PATH": path_without_clang(tmp_path)})
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "clang not found: run ci/install.sh" in text, text[-3000:]
    assert "Error 127" not in text
    assert not list((tmp_path / "wheels").glob("*.whl"))


IMPORT_WITHOUT = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = ("rich", "pyroute2", "matplotlib")

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
for name in BLOCKED:
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the import block did not work for {name}")
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


@pytest.mark.parametrize("module", ["xo.engine", "xo.refapp", "xo.http1", "xo.appconfig"])
def test_app_pieces_import_with_the_core_dependencies_only(module: str) -> None:
    """What a plugin builds on (the asyncio driver, the reference app's pieces,
    the HTTP parser, the config) imports without rich, pyroute2 or matplotlib:
    a real import hook in a fresh interpreter refuses them."""
    out = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT, module],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
