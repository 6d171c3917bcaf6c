"""The repository stands alone: no tracked file names a work item (a tracker's ticket or a working
period, written as the word followed by its number). Such labels mean nothing to a reader of the tree;
name the question or the feature instead.

The pattern is assembled from pieces so that this file's own text does not match it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_WORDS = ("iss" + "ue", "sess" + "ion")
# The word, then an optional separator (space, underscore, hyphen) and '#', then digits. Not preceded
# by a letter (so a word merely ending in it does not count), but preceded by '_' or '/' it does,
# as in a file or folder name.
WORK_ITEM = re.compile(r"(?<![a-z])(?:" + "|".join(_WORDS) + r")[ _-]?#?[0-9]+\b", re.IGNORECASE)

BINARY_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".npy", ".npz", ".pt", ".pth", ".gz", ".zip", ".nii",
     ".h5", ".pkl", ".parquet", ".ico", ".woff", ".woff2", ".ttf"}
)


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the tracked files")
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout (no .git): cannot list the tracked files")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout
    names = [n for n in out.decode("utf-8", errors="surrogateescape").split("\0") if n]
    return [ROOT / n for n in names]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file or one deleted in the working tree."""
    if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def work_item_hits(paths: list[Path]) -> list[str]:
    """'relative/path:line: text' for each line of `paths` that names a work item, then
    'folder/or/file: (a name; N tracked files)' for each first folder or file name that names one."""
    hits, named = [], {}
    for path in paths:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        parts = rel.parts
        first = next((i for i, part in enumerate(parts) if WORK_ITEM.search(part)), None)
        if first is not None:
            prefix = "/".join(parts[: first + 1])
            named[prefix] = named.get(prefix, 0) + 1
        text = _text(path)
        if text is None or WORK_ITEM.search(text) is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if WORK_ITEM.search(line):
                hits.append(f"{rel}:{number}: {line.strip()[:120]}")
    hits += [f"{prefix}: (a name; {count} tracked file(s))" for prefix, count in named.items()]
    return hits


def test_pattern_catches_work_item_words_and_spares_others():
    word, period = _WORDS
    caught = [f"{word.title()} 12", f"{word} 15's attack", f"since {word} 2", f"{word}12/{period}6",
              f"transfer_{period}3.jsonl", f"{word} #4", f"{period.upper()}-7", f"({word}_3)"]
    spared = [f"t{word} 3", f"{word}s 3", f"{period}_id", f"{period}s 2", f"{word} tracker", "ses-01"]
    assert [s for s in caught if not WORK_ITEM.search(s)] == []
    assert [s for s in spared if WORK_ITEM.search(s)] == []


def test_hits_name_file_and_line_and_skip_binary_files(tmp_path):
    word = _WORDS[0]
    text = tmp_path / "notes.md"
    text.write_text(f"first line\nsee {word} 9 here\n")
    binary = tmp_path / "array.npy"
    binary.write_bytes(f"{word} 9".encode())
    assert work_item_hits([text, binary]) == [f"{text}:2: see {word} 9 here"]


def test_no_tracked_file_names_a_work_item():
    paths = _tracked_files()
    assert len(paths) > 10, f"expected the repository's tracked files, git listed {len(paths)}"
    # This file, even before it is tracked: its pattern must not match its own text.
    paths = sorted(set(paths) | {Path(__file__).resolve()})
    hits = work_item_hits(paths)
    listing = "\n".join(hits)
    assert hits == [], f"{len(hits)} hit(s) name a work item (name the question or feature):\n{listing}"
