"""`xo nginx patch`: the checked-in patch matches the module's source, it
applies to the nginx tree it was made for, and bad trees get a clear error
that writes nothing."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest
from xo import nginx

ORIGS = sorted((nginx.MODULE_DIR / "build/src").glob("nginx_*.orig.tar.gz"))
needs_orig = pytest.mark.skipif(not ORIGS, reason="no nginx .orig.tar.gz "
                                "(bash ci/build-nginx.sh static fetches it)")


@needs_orig
def test_checked_in_patch_is_current(tmp_path: Path) -> None:
    out = nginx.write_patch(ORIGS[-1], tmp_path)
    pinned = nginx.PATCH_DIR / out.name
    assert pinned.exists(), f"{pinned} missing: xo nginx patch --source {ORIGS[-1]}"
    assert out.read_text() == pinned.read_text(), \
        f"{pinned} is stale: xo nginx patch --source {ORIGS[-1]}"


@needs_orig
def test_patch_applies_and_adds_the_option(tmp_path: Path) -> None:
    with tarfile.open(ORIGS[-1]) as tar:
        tar.extractall(tmp_path)  # noqa: S202 (Debian's tarball, checked by apt)
    tree = next(p for p in tmp_path.iterdir() if p.is_dir())
    patch = nginx.PATCH_DIR / f"nginx-{nginx.tree_version(tree)}-xo.patch"
    res = subprocess.run(["patch", "-p1", "--forward", "-i", str(patch)], cwd=tree,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tree / "src/http/modules/xo/ngx_http_xo_module.c").read_text() == \
        (nginx.MODULE_DIR / "ngx_http_xo_module.c").read_text()
    help_text = subprocess.run(["sh", "./configure", "--help"], cwd=tree, capture_output=True,
                               text=True).stdout
    assert "--with-http_xo_module" in help_text
    # A tree patched already is refused.
    with pytest.raises(nginx.NginxBuildError, match="patched"):
        nginx.make_patch(tree)


def test_not_a_tree_is_refused(tmp_path: Path) -> None:
    with pytest.raises(nginx.NginxBuildError, match="not an nginx source tree"):
        nginx.write_patch(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = subprocess.run([str(Path(nginx.REPO) / ".venv/bin/xo"), "nginx", "patch", "--source",
                          str(tmp_path / "missing.tar.gz")], capture_output=True, text=True)
    assert res.returncode == 1 and "no such file" in res.stderr, res
