"""What a site's error reply may say: the message with subject identifiers and file paths masked.

The site's own console (the SuperNode log) gets the full message; the coordinator gets this: file paths
become `<path>`, BIDS entities `sub-<id>` / `ses-<id>`, and the value after "subject", "subject id" or
"participant" (quoted or not, or a bracketed list of them) becomes `<id>`.
"""

from __future__ import annotations

import re

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:~|\.{1,2})?(?:[/\\][^\s'\"/\\,;:)\]]+)+[/\\]?")
_BIDS = re.compile(r"\b(sub|ses)-[A-Za-z0-9]+")
_ID_LIST = re.compile(r"\b(subjects?(?: ids?)?|participants?(?:_id| ids?)?)\b(\s*[:=]?\s*)\[[^\]]*\]", re.IGNORECASE)
_ID_ONE = re.compile(
    r"\b(subject(?: id)?|participant(?:_id| id)?)\b(\s*[:=]\s*|\s+)('[^']*'|\"[^\"]*\"|[^\s,;:)<>'\"]+)", re.IGNORECASE
)


def scrub(text: str) -> str:
    """`text` without file paths or subject identifiers (see the module's docstring)."""
    text = _PATH.sub("<path>", text)
    text = _BIDS.sub(r"\1-<id>", text)
    text = _ID_LIST.sub(r"\1\2[<ids>]", text)
    return _ID_ONE.sub(r"\1\2<id>", text)
