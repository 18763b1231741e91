"""cffi build script: compiles the core's C sources into ``xo._xo_cffi``.

The declarations come straight from the public headers (the part between
the XO_CDEF markers), so the binding can never drift from the C API.
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

CORE = Path(__file__).resolve().parents[2]
INCLUDE = CORE / "include"
CDEF_RE = re.compile(r"/\* XO_CDEF_BEGIN \*/(.*?)/\* XO_CDEF_END \*/", re.S)
# The flags libxo.a is built with (xo_core/Makefile reads the same file).
CFLAGS_FILE = CORE / "cflags.txt"
# cffi's generated wrappers take arguments they do not use (self, noarg);
# the pragma silences that for the generated code only, after our headers.
GENERATED_CODE_PRAGMA = '#pragma GCC diagnostic ignored "-Wunused-parameter"'


def core_cflags() -> list[str]:
    """The core's compiler flags (-Werror included), from cflags.txt."""
    flags: list[str] = []
    for line in CFLAGS_FILE.read_text().splitlines():
        if not line.startswith("#"):
            flags.extend(line.split())
    if "-Werror" not in flags:
        raise RuntimeError(f"{CFLAGS_FILE} lost -Werror: the core builds strict")
    return flags


def public_declarations() -> str:
    parts = []
    for header in sorted(INCLUDE.glob("*.h")):
        for block in CDEF_RE.findall(header.read_text()):
            # cffi's parser takes no comments inside #define lines.
            block = re.sub(r"/\*.*?\*/", "", block, flags=re.S)
            parts.append(block)
    return "\n".join(parts)


def make_builder(absolute: bool) -> FFI:
    """setuptools wants source paths relative to setup.py; a direct
    ffibuilder.compile() runs inside its own directory and needs them absolute."""
    root = CORE.parent

    def path(p: Path) -> str:
        return str(p if absolute else p.relative_to(root))

    builder = FFI()
    builder.cdef(public_declarations())
    builder.set_source(
        "xo._xo_cffi",
        "\n".join([*(f'#include "{h.name}"' for h in sorted(INCLUDE.glob("*.h"))),
                   GENERATED_CODE_PRAGMA]),
        sources=sorted(path(p) for p in (CORE / "src").glob("*.c")),
        include_dirs=[path(INCLUDE), path(CORE / "src")],
        libraries=["crypto", "bpf", "mnl", "pthread"],
        extra_compile_args=core_cflags(),
    )
    return builder


ffibuilder = make_builder(absolute=False)

if __name__ == "__main__":
    # Developer rebuild: compile under build/ and drop the module next to
    # the package sources (what an editable install imports).
    import os
    import shutil

    os.chdir(CORE.parent)
    built = Path(make_builder(absolute=True).compile(tmpdir="build/cffi"))
    for stale in (CORE / "python" / "xo").glob("_xo_cffi*.so"):
        stale.unlink()
    shutil.copy2(built, CORE / "python" / "xo" / built.name)
