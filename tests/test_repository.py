"""The repository stands alone: no tracked file names a work item (a tracker's ticket or a working
period, written as the word followed by its number), and none cites a file outside the repository (a
folder beside it, an absolute working or temporary path, a note that is not tracked). Such labels and
citations mean nothing to a reader of the tree: name the question or the feature, and put what a reader
needs into docs/.

The patterns are assembled from pieces so that this file's own text does not match them.
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
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".gif",
        ".pdf",
        ".npy",
        ".npz",
        ".pt",
        ".pth",
        ".gz",
        ".zip",
        ".nii",
        ".h5",
        ".pkl",
        ".parquet",
        ".ico",
        ".woff",
        ".woff2",
        ".ttf",
    }
)


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the tracked files")
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout (no .git): cannot list the tracked files")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
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
    caught = [
        f"{word.title()} 12",
        f"{word} 15's attack",
        f"since {word} 2",
        f"{word}12/{period}6",
        f"transfer_{period}3.jsonl",
        f"{word} #4",
        f"{period.upper()}-7",
        f"({word}_3)",
    ]
    spared = [f"t{word} 3", f"{word}s 3", f"{period}_id", f"{period}s 2", f"{word} tracker", "ses-01"]
    assert [s for s in caught if not WORK_ITEM.search(s)] == []
    assert [s for s in spared if WORK_ITEM.search(s)] == []


def test_hits_name_file_and_line_and_skip_binary_files(tmp_path):
    word = _WORDS[0]
    text = tmp_path / "notes.txt"
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


# Outside the repository: the folder beside it (`..` then the name) or its design / reference notes, and
# absolute working, temporary or home folders. Not preceded by a word character, '.', '~' or '-', so a
# URL's path or a relative folder of ours (runs/tmp/...) does not count.
_BESIDE = "sha" + "red"
_ABSOLUTE = ("wo" + "rk", "t" + "mp", "ho" + "me", "ro" + "ot", "Us" + "ers")
OUTSIDE_PATH = re.compile(
    r"\.\./"
    + _BESIDE
    + r"\b"
    + r"|(?<![\w.-])"
    + _BESIDE
    + r"/(?:design|reference|tools|hooks)\b"
    + r"|(?<![\w.~-])/(?:"
    + "|".join(_ABSOLUTE)
    + r")/"
)
# A Markdown file cited by name (`docs/model.md`, `README.md`): it must be one of ours.
MARKDOWN_NAME = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w-]*)\.md\b")
# Markdown files our commands write (not tracked): `brainjepa bench --profile` writes profile.md, a
# site's DP ledger gets <ledger stem>-report.md beside it.
WRITTEN_BY_OUR_TOOLS = re.compile(r"profile|[\w-]+-report")


def is_run_record(rel: Path) -> bool:
    """Machine-written records of experiment runs (provenance, ledger, tables): they log where a run
    wrote, as written at the time; they cite nothing."""
    return rel.parts[:1] == ("experiments",) and rel.suffix in {".json", ".jsonl", ".csv"}


def outside_hits(paths: list[Path], markdown_names: set[str]) -> list[str]:
    """'relative/path:line: text' for each line of `paths` that cites a path outside the repository, or
    a Markdown file that is neither in `markdown_names` (the stems of the tracked .md files) nor one our
    commands write."""
    hits = []
    for path in paths:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        text = _text(path)
        if text is None or is_run_record(rel):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            unknown = [
                m.group(0)
                for m in MARKDOWN_NAME.finditer(line)
                if m.group(1) not in markdown_names and not WRITTEN_BY_OUR_TOOLS.fullmatch(m.group(1))
            ]
            if OUTSIDE_PATH.search(line) or unknown:
                hits.append(f"{rel}:{number}: {line.strip()[:120]}")
    return hits


def test_outside_pattern_catches_paths_outside_and_spares_ours():
    beside = _BESIDE
    work, temp, home = _ABSOLUTE[:3]
    caught = [
        f"see ../{beside}/x.csv",
        f"(`{beside}/reference/anchor.txt`)",
        f"{beside}/design/notes",
        f'Path("/{work}/{beside}/a.csv")',
        f"--out /{temp}/real",
        f"`/{home}/me/data`",
        f"ledger: /{work}/main/experiments/ledger.jsonl",
    ]
    spared = [
        f"{beside}/ is where a checkout keeps it",
        "https://example.org/tmp/x",
        f"runs/{temp}/x",
        "--out data/real",
        f"a {beside} folder",
        f"~/{temp}/x",
    ]
    assert [s for s in caught if not OUTSIDE_PATH.search(s)] == []
    assert [s for s in spared if OUTSIDE_PATH.search(s)] == []


def test_outside_hits_name_file_and_line_and_unknown_markdown(tmp_path):
    temp, md = _ABSOLUTE[1], "." + "md"
    text = tmp_path / "module.py"
    cites = f'"""See docs/model{md}, design-notes{md}; writes profile{md}, site-report{md}."""'
    text.write_text(f'{cites}\nOUT = "/{temp}/x"\nfine = 1\n')
    assert outside_hits([text], {"model"}) == [f"{text}:1: {cites}", f'{text}:2: OUT = "/{temp}/x"']
    assert outside_hits([text], {"model", "design-notes"}) == [f'{text}:2: OUT = "/{temp}/x"']
    record = ROOT / "experiments" / "run" / "provenance.json"
    assert is_run_record(record.relative_to(ROOT)) and not is_run_record(Path("experiments/run/report.md"))


def test_no_tracked_file_cites_a_path_outside_the_repository():
    paths = _tracked_files()
    assert len(paths) > 10, f"expected the repository's tracked files, git listed {len(paths)}"
    paths = sorted(set(paths) | {Path(__file__).resolve()})
    markdown_names = {p.stem for p in paths if p.suffix == ".md"}
    assert "README" in markdown_names, f"expected README.md among the tracked files: {sorted(markdown_names)}"
    hits = outside_hits(paths, markdown_names)
    listing = "\n".join(hits)
    assert hits == [], (
        f"{len(hits)} line(s) cite a path outside the repository or an untracked note (cite docs/ instead; "
        f"put what a reader needs there):\n{listing}"
    )
