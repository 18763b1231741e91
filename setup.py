"""Builds the cffi extension from xo_core's C sources and the eBPF objects,
and installs the ``xo`` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PKG_DATA = ROOT / "xo_core" / "python" / "xo" / "data"


class BuildWithBpf(build_py):
    """Compile bpf/ with clang and ship the objects as package data."""

    def run(self) -> None:
        bpf = ROOT / "bpf"
        if (bpf / "Makefile").exists():
            clang = os.environ.get("CLANG", "clang")
            up_to_date = subprocess.run(["make", "-q", "-C", str(bpf)],
                                        capture_output=True).returncode == 0
            if not up_to_date and shutil.which(clang) is None:
                # One clear line instead of make's "Error 127".
                sys.exit(f"{clang} not found: run ci/install.sh (it installs clang, "
                         f"which compiles the eBPF programs in bpf/)")
            rc = subprocess.run(["make", "-C", str(bpf)]).returncode
            if rc:
                sys.exit(f"building the eBPF programs failed (make -C bpf: exit {rc}); "
                         f"its output is above")
            PKG_DATA.mkdir(exist_ok=True)
            for obj in (bpf / "build").glob("*.bpf.o"):
                shutil.copy2(obj, PKG_DATA / obj.name)
        super().run()


# build_py fills it; it must exist before setuptools lists the packages.
PKG_DATA.mkdir(exist_ok=True)

setup(
    cmdclass={"build_py": BuildWithBpf},
    package_dir={
        "xo": "xo_core/python/xo",
        # The Ceph plugin's Python side lives with the plugin (plugins/ceph/README.md).
        "xo.ceph": "plugins/ceph/xo_ceph",
    },
    packages=["xo", "xo.lab", "xo.data", "xo.ceph"],  # data/: the compiled eBPF objects
    package_data={"xo": ["data/*.bpf.o"]},
    cffi_modules=["xo_core/python/xo/_build_cffi.py:ffibuilder"],
)
