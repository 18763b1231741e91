"""The repository explains itself: its text points at its own files only."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Being rewritten elsewhere (the protocol moves into C); their references go then.
REWRITE_IN_PROGRESS = {"xo_core/python/xo/engine.py", "xo_core/python/xo/refapp.py",
                       "xo_core/python/xo/demo.py"}
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared\b")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, text=True, check=True)
    files = []
    for rel in out.stdout.splitlines():
        path = ROOT / rel
        if path.is_file() and path.suffix in (".md", ".py", ".c", ".h", ".sh", ".toml", ""):
            files.append(rel)
    return files


def test_nothing_refers_to_a_file_outside_the_repository() -> None:
    hits = []
    for rel in tracked_text_files():
        if rel in REWRITE_IN_PROGRESS or rel == "tests/test_repo_docs.py":
            continue
        for n, line in enumerate((ROOT / rel).read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_markdown_links_resolve_inside_the_repository() -> None:
    broken = []
    for rel in tracked_text_files():
        if not rel.endswith(".md"):
            continue
        for target in MD_LINK.findall((ROOT / rel).read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = ((ROOT / rel).parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{rel}: {target}")
    assert not broken, broken

