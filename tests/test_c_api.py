"""The C core as a plain C library: what the nginx module relies on.

A C program (tests/c/xo_c_smoke.c) built against nothing but the public
headers and xo_core/build/libxo.a moves a loopback TCP connection, runs the
control-channel handshake and writes steering rules. The headers are also
compiled on their own as strict C99 and as C++ (the extern "C" guard).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "xo_core" / "include"
LIBXO = ROOT / "xo_core" / "build" / "libxo.a"
SMOKE_SRC = ROOT / "tests" / "c" / "xo_c_smoke.c"
BPF_OBJECTS = (
    ROOT / "xo_core" / "python" / "xo" / "data" / "xo_steer.bpf.o",
    ROOT / "bpf" / "build" / "xo_steer.bpf.o",
)
STRICT = ["-Wall", "-Wextra", "-Werror"]
PUBLIC_HEADERS = ["xo.h", "xo_steer.h", "xo_probe.h"]
# The paper counts 13 system calls for serialization; the prototype 16-19.
MAX_CAPTURE_SYSCALLS = 20


@dataclass(frozen=True)
class CoreLib:
    archive: Path
    libs: list[str]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def must(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run cmd; fail the test with its output if it fails."""
    proc = run(cmd, timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="module")
def core_lib() -> CoreLib:
    """Build libxo.a (strict flags are in the Makefile) and ask it what a
    program linking it needs besides."""
    must(["make", "-s", "-C", str(ROOT / "xo_core")])
    assert LIBXO.is_file(), f"make did not produce {LIBXO}"
    libs = must(["make", "-s", "-C", str(ROOT / "xo_core"), "libs"]).stdout.split()
    assert libs, "make libs printed nothing"
    return CoreLib(LIBXO, libs)


def bpf_object() -> Path:
    for path in BPF_OBJECTS:
        if path.is_file():
            return path
    must(["make", "-s", "-C", str(ROOT / "bpf")])
    path = BPF_OBJECTS[-1]
    assert path.is_file(), f"make -C bpf did not produce {path}"
    return path


def needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (build-essential / g++)")
    return path


# ---- the smoke program ---------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (TCP_REPAIR, bpf())")
def test_c_program_uses_public_api(core_lib: CoreLib, tmp_path: Path) -> None:
    exe = tmp_path / "xo_c_smoke"
    must(
        [needs("cc"), *STRICT, f"-I{INCLUDE}", str(SMOKE_SRC), str(core_lib.archive),
         *core_lib.libs, "-o", str(exe)]
    )
    proc = run([str(exe), str(bpf_object())], timeout=60)
    report = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{report}"
    assert "C API OK" in proc.stdout.splitlines(), report
    assert "FAIL" not in proc.stderr, report

    found = re.search(r"^capture syscalls: (\d+)$", proc.stdout, re.MULTILINE)
    assert found, f"no capture syscall count printed\n{report}"
    capture_calls = int(found.group(1))
    assert 0 < capture_calls <= MAX_CAPTURE_SYSCALLS, report
    assert re.search(r"^restore syscalls: \d+$", proc.stdout, re.MULTILINE), report


# ---- header hygiene ------------------------------------------------------------


@pytest.mark.parametrize("header", PUBLIC_HEADERS)
def test_header_is_strict_c99(header: str, core_lib: CoreLib, tmp_path: Path) -> None:
    """The header alone, as pedantic C99, compiles and links against libxo.a."""
    src = tmp_path / "only_header.c"
    src.write_text(
        f"#include <{header}>\n"
        "\n"
        "int main(void)\n"
        "{\n"
        "\tstruct xo_tcp_state st = { 0 };\n"
        "\n"
        "\txo_state_release(&st);\n"
        "\treturn xo_strerror(XO_E_AUTH)[0] != 'X';\n"
        "}\n"
    )
    exe = tmp_path / "only_header"
    must(
        [needs("cc"), "-std=c99", "-pedantic", *STRICT, f"-I{INCLUDE}", str(src),
         str(core_lib.archive), *core_lib.libs, "-o", str(exe)]
    )
    must([str(exe)])


# Redeclaring a function with C linkage is an error in C++ unless the header
# already gave it C linkage: this is what proves the extern "C" guard.
CXX_SOURCE = """\
#include <{header}>

extern "C" const char *xo_last_error(void);
extern "C" const char *xo_strerror(int code);
extern "C" int xo_tcp_capture(int fd, struct xo_tcp_state *st);
extern "C" int xo_chan_open(struct xo_chan *ch, uint8_t *buf, size_t len,
                            struct xo_msg *msg);
{extra}
int main()
{{
    return xo_strerror(XO_E_AUTH)[0] != 'X';
}}
"""
CXX_STEER_EXTRA = """\
extern "C" int xo_steer_open(const struct xo_steer_opts *opts, struct xo_steer **out);
extern "C" void xo_rules_destroy(struct xo_rules *r);
"""


def cxx_source(header: str) -> str:
    extra = CXX_STEER_EXTRA if header == "xo_steer.h" else ""
    return CXX_SOURCE.format(header=header, extra=extra)


@pytest.mark.parametrize("header", PUBLIC_HEADERS)
def test_header_from_cxx(header: str, core_lib: CoreLib, tmp_path: Path) -> None:
    gxx = needs("g++")
    src = tmp_path / "from_cxx.cpp"
    src.write_text(cxx_source(header))
    must([gxx, "-fsyntax-only", "-pedantic", *STRICT, f"-I{INCLUDE}", str(src)])
    # And the unmangled names resolve against the C library.
    exe = tmp_path / "from_cxx"
    must([gxx, *STRICT, f"-I{INCLUDE}", str(src), str(core_lib.archive), *core_lib.libs,
          "-o", str(exe)])
    must([str(exe)])


def test_cxx_check_catches_missing_guard(tmp_path: Path) -> None:
    """Negative control: xo.h with its extern "C" guard cut out must fail the
    C++ check above, or that check proves nothing."""
    gxx = needs("g++")
    text = (INCLUDE / "xo.h").read_text()
    stripped, n = re.subn(
        r'#ifdef __cplusplus\s*\n(extern "C" \{|\})\s*\n#endif\s*\n', "", text
    )
    assert n == 2, "xo.h no longer has the expected extern \"C\" guard shape"
    (tmp_path / "xo.h").write_text(stripped)
    src = tmp_path / "from_cxx.cpp"
    src.write_text(cxx_source("xo.h"))
    proc = run([gxx, "-fsyntax-only", f"-I{tmp_path}", str(src)])
    assert proc.returncode != 0, "g++ accepted C-linkage redeclarations without the guard"
    assert "linkage" in proc.stderr, proc.stderr
