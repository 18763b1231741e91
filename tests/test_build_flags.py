"""One set of compiler flags for both builds of the C core.

xo_core/Makefile (libxo.a) and the cffi build (xo._xo_cffi) read the same
file, xo_core/cflags.txt; these tests check they agree and that the cffi
path really turns a warning into a failed build, as make does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cffi import FFI, VerificationError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "xo_core" / "python" / "xo"))
import _build_cffi  # noqa: E402  (the build script, not the installed package)


def test_make_and_cffi_use_the_same_flags() -> None:
    out = subprocess.run(["make", "-s", "-C", str(ROOT / "xo_core"), "cflags"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == _build_cffi.core_cflags()
    assert "-Werror" in out.stdout.split()


def test_the_real_builder_compiles_with_the_shared_flags() -> None:
    builder = _build_cffi.make_builder(absolute=True)
    # cffi keeps set_source()'s keyword arguments for the Extension.
    kwds = builder._assigned_source[3]  # type: ignore[attr-defined]
    assert kwds["extra_compile_args"] == _build_cffi.core_cflags()


def test_a_warning_fails_the_cffi_build(tmp_path: Path) -> None:
    ffi = FFI()
    ffi.cdef("int xo_flags_probe(void);")
    # An unused variable: -Wall warns, -Werror must make it fatal.
    ffi.set_source("_xo_flags_probe",
                   "int xo_flags_probe(void) { int unused_var; return 0; }",
                   extra_compile_args=_build_cffi.core_cflags())
    with pytest.raises(VerificationError, match="CompileError"):
        ffi.compile(tmpdir=str(tmp_path))
    assert not list(tmp_path.glob("_xo_flags_probe*.so"))
