"""``xo nginx patch`` and ``xo nginx build``: XO compiled into nginx from a
source tree (the static build; the dynamic module for Debian's packaged
nginx is ci/build-nginx.sh).

``patch`` writes ``patches/nginx-<version>-xo.patch`` for a given nginx
source tree (a directory or its .tar.gz, e.g. Debian's
``nginx_<version>.orig.tar.gz`` from ``apt-get source --download-only
nginx``). Applied with ``patch -p1``, it adds the module as a built-in:

- ``src/http/modules/xo/ngx_http_xo_module.c``: the module (a copy of
  ``plugins/nginx/ngx_http_xo_module.c``);
- ``src/http/modules/xo/config``: its build glue, linking the XO core named
  by the ``XO_CORE`` environment variable (``include/``, ``build/libxo.a``);
- ``auto/options``: a ``--with-http_xo_module`` configure option that adds
  that directory to the static modules.

``build`` unpacks the tree, generates and applies the patch, configures it
with ``--with-http_xo_module`` and builds and installs nginx under
``plugins/nginx/build/static`` (``sbin/nginx``), the core being this
repository's ``xo_core``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "plugins/nginx"
PATCH_DIR = REPO / "patches"
STATIC_PREFIX = MODULE_DIR / "build/static"
IN_TREE = "src/http/modules/xo"
OPTION = "--with-http_xo_module"

# What the static build is configured with besides the module: the parts
# the integration tests use that nginx does not build by default.
CONFIGURE_FLAGS = ["--with-threads", "--with-http_dav_module", "--with-http_ssl_module",
                   "--with-debug"]

IN_TREE_CONFIG = """\
# Build glue of ngx_http_xo_module compiled into nginx (--with-http_xo_module),
# added by the XO patch. XO_CORE: the XO core's folder (include/,
# build/libxo.a), an absolute path.
ngx_addon_name=ngx_http_xo_module
if [ -z "$XO_CORE" ] || [ ! -f "$XO_CORE/build/libxo.a" ]; then
    echo "$0: error: $OPTION needs XO_CORE=<the XO core's folder> with build/libxo.a"
    exit 1
fi
ngx_module_type=HTTP
ngx_module_name=ngx_http_xo_module
ngx_module_incs="$XO_CORE/include"
ngx_module_deps=
ngx_module_srcs="$ngx_addon_dir/ngx_http_xo_module.c"
ngx_module_libs="$XO_CORE/build/libxo.a -lcrypto -lbpf -lmnl -lpthread"
if grep -q "xo_proto_park_fd" "$XO_CORE/include/xo_proto.h"; then
    CFLAGS="$CFLAGS -DXO_HAVE_PARK_FD"
fi
CFLAGS="$CFLAGS -Wall -Wextra -Wno-unused-parameter -Werror"
. auto/module
""".replace("$OPTION", OPTION)

_OPTION_ANCHOR = re.compile(r"^(\s*)--add-module=\*\)", re.M)
_HELP_ANCHOR = re.compile(r"^  --add-module=PATH .*$", re.M)


class NginxBuildError(Exception):
    """A source tree or a build step that does not work; the message says why."""


def tree_version(tree: Path) -> str:
    header = tree / "src/core/nginx.h"
    try:
        m = re.search(r'#define NGINX_VERSION\s+"([^"]+)"', header.read_text())
    except FileNotFoundError as exc:
        raise NginxBuildError(f"{tree}: not an nginx source tree ({header} missing)") from exc
    if not m:
        raise NginxBuildError(f"{header}: no NGINX_VERSION")
    return m.group(1)


def _patched_options(text: str, where: Path) -> str:
    if OPTION in text:
        raise NginxBuildError(f"{where}: already patched ({OPTION} is there)")
    m = _OPTION_ANCHOR.search(text)
    h = _HELP_ANCHOR.search(text)
    if not m or not h:
        raise NginxBuildError(f"{where}: no --add-module option to extend (not an nginx "
                              "1.9.11+ tree?)")
    indent = m.group(1).split("\n")[-1]
    start = m.start() + len(m.group(1)) - len(indent)  # where the --add-module line starts
    case = f"{indent}{OPTION})".ljust(len(indent) + 33) + f'NGX_ADDONS="$NGX_ADDONS {IN_TREE}" ;;\n'
    text = text[:start] + case + text[start:]
    h = _HELP_ANCHOR.search(text)
    assert h
    help_line = f"  {OPTION}".ljust(37) + "enable ngx_http_xo_module (XO connection offload;\n" \
        + " " * 37 + "XO_CORE=the XO core's folder)\n"
    return text[:h.start()] + help_line + text[h.start():]


def _diff(path: str, old: str | None, new: str) -> str:
    a = [] if old is None else old.splitlines(keepends=True)
    b = new.splitlines(keepends=True)
    lines = difflib.unified_diff(a, b, "/dev/null" if old is None else f"a/{path}",
                                 f"b/{path}", n=3)
    out = "".join(ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n"
                  for ln in lines)
    return f"diff -ruN a/{path} b/{path}\n" + out


def make_patch(tree: Path, module_dir: Path = MODULE_DIR) -> str:
    """The patch text that compiles the module into this nginx tree."""
    tree_version(tree)
    options = tree / "auto/options"
    if (tree / IN_TREE).exists():
        raise NginxBuildError(f"{tree / IN_TREE} exists already: a patched tree?")
    source = (module_dir / "ngx_http_xo_module.c").read_text()
    header = ("XO connection offload for nginx: ngx_http_xo_module compiled in\n"
              f"(./configure {OPTION}, with XO_CORE=<the XO core's folder>).\n"
              "Generated by `xo nginx patch` from plugins/nginx/ngx_http_xo_module.c.\n\n")
    return header + "".join([
        _diff("auto/options", options.read_text(),
              _patched_options(options.read_text(), options)),
        _diff(f"{IN_TREE}/config", None, IN_TREE_CONFIG),
        _diff(f"{IN_TREE}/ngx_http_xo_module.c", None, source),
    ])


def unpack(source: Path, into: Path) -> Path:
    """The nginx tree of source (a directory, or a .tar.gz unpacked into `into`)."""
    if source.is_dir():
        return source
    if not source.is_file():
        raise NginxBuildError(f"{source}: no such file or directory")
    try:
        with tarfile.open(source) as tar:
            for member in tar.getmembers():  # nothing outside `into`, no device files
                target = (into / member.name).resolve()
                if into.resolve() not in target.parents or not (
                        member.isfile() or member.isdir() or member.issym()):
                    raise NginxBuildError(f"{source}: odd member {member.name!r}")
            tar.extractall(into)  # noqa: S202 (checked above)
    except (tarfile.TarError, OSError) as exc:
        raise NginxBuildError(f"{source}: cannot unpack: {exc}") from exc
    tops = [p for p in into.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise NginxBuildError(f"{source}: expected one top folder, found {len(tops)}")
    return tops[0]


def write_patch(source: Path, out_dir: Path = PATCH_DIR) -> Path:
    with tempfile.TemporaryDirectory(prefix="xo-nginx-src.") as tmp:
        tree = unpack(source, Path(tmp))
        text = make_patch(tree)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"nginx-{tree_version(tree)}-xo.patch"
        out.write_text(text)
    return out


def _run(step: str, argv: list[str], cwd: Path, log: Path,
         env: dict[str, str] | None = None) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        res = subprocess.run(argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise NginxBuildError(f"{step} failed (exit {res.returncode}); end of {log}:\n{tail}")


def build(source: Path, prefix: Path = STATIC_PREFIX, jobs: int = 2,
          status: object = None) -> Path:
    """Patch, configure, make, install; returns the nginx binary."""

    def say(text: str) -> None:
        if status is not None:
            status.update(text)  # type: ignore[attr-defined]
        else:
            print(text, flush=True)

    core = REPO / "xo_core"
    say("building the XO core (libxo.a)")
    res = subprocess.run(["make", "-s", "-C", str(core), "build/libxo.a"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise NginxBuildError(f"make -C xo_core build/libxo.a failed:\n{res.stderr[-2000:]}")
    work = prefix.parent / "static-src"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = prefix.parent / "static-build.log"
    log.write_text("")
    say(f"unpacking {source}")
    tree = unpack(source, work)
    if tree == source:  # a directory: build a copy, leave it untouched
        tree = work / source.name
        shutil.copytree(source, tree, symlinks=True)
    version = tree_version(tree)
    say(f"writing the patch for nginx {version}")
    PATCH_DIR.mkdir(exist_ok=True)
    patch = PATCH_DIR / f"nginx-{version}-xo.patch"
    patch.write_text(make_patch(tree))
    say(f"applying {patch.relative_to(REPO)}")
    _run("patch", ["patch", "-p1", "--forward", "-i", str(patch)], tree, log)
    env = {**os.environ, "XO_CORE": str(core)}
    say("configure")
    _run("configure", ["./configure", f"--prefix={prefix}", OPTION, *CONFIGURE_FLAGS],
         tree, log, env)
    say(f"make -j{jobs} (about 40 s)")
    _run("make", ["make", f"-j{jobs}"], tree, log, env)
    say("make install")
    shutil.rmtree(prefix, ignore_errors=True)
    _run("make install", ["make", "install"], tree, log, env)
    binary = prefix / "sbin/nginx"
    if not binary.exists():
        raise NginxBuildError(f"{binary} missing after make install (see {log})")
    shutil.rmtree(work, ignore_errors=True)
    return binary


def cmd_patch(args: argparse.Namespace) -> int:
    out = write_patch(Path(args.source), Path(args.out) if args.out else PATCH_DIR)
    print(f"patch written to {out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    with console.status("xo nginx build") as status:
        binary = build(Path(args.source), Path(args.prefix) if args.prefix else STATIC_PREFIX,
                       args.jobs, status)
    version = subprocess.run([str(binary), "-V"], capture_output=True, text=True).stderr
    console.print(f"built {binary}: {version.splitlines()[0] if version else '?'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    nginx = sub.add_parser("nginx", help="XO compiled into nginx from its source")
    nsub = nginx.add_subparsers(dest="nginx_command", required=True)
    p = nsub.add_parser("patch", help="write patches/nginx-<version>-xo.patch for a tree")
    p.add_argument("--source", required=True,
                   help="nginx source tree: a folder or its .tar.gz (e.g. Debian's "
                        "nginx_<version>.orig.tar.gz)")
    p.add_argument("--out", help="folder for the patch (default: patches/)")
    p.set_defaults(func=cmd_patch)
    b = nsub.add_parser("build", help="patch, configure and build a static nginx with XO")
    b.add_argument("--source", required=True, help="nginx source tree: a folder or its .tar.gz")
    b.add_argument("--prefix", help=f"install prefix (default {STATIC_PREFIX})")
    b.add_argument("--jobs", type=int, default=2, help="make -j (default 2)")
    b.set_defaults(func=cmd_build)
