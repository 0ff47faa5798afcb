"""The attribution notices the credits screen shows, read from ``LICENSE-NOTICES``.

Found, in order: an explicit path; the installed distribution's license files (a wheel keeps them in
``npctalk-*.dist-info/licenses/``); the source checkout this package sits in (an editable install).
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

NOTICES_NAME = "LICENSE-NOTICES"


class NoticesNotFound(FileNotFoundError):
    """No LICENSE-NOTICES anywhere the demo looks."""


def find_notices(explicit: Path | None = None) -> Path:
    """The notices file; raises ``NoticesNotFound`` listing where it looked."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    try:
        files = metadata.distribution("npctalk").files or []
        candidates += [Path(str(f.locate())) for f in files if f.name == NOTICES_NAME]
    except metadata.PackageNotFoundError:
        pass
    candidates.append(Path(__file__).resolve().parents[1] / NOTICES_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise NoticesNotFound(f"{NOTICES_NAME} not found; looked at: {', '.join(str(c) for c in candidates)}")


def credits_lines(explicit: Path | None = None) -> list[str]:
    """The credits screen's lines: a heading, then the notices text as written (tabs expanded)."""
    head = ["npctalk demo — Ashford village", "", "Code: npctalk contributors, MIT License.",
            "Art: drawn by the demo's own code with pygame primitives; no downloaded assets.", ""]
    try:
        text = find_notices(explicit).read_text(encoding="utf-8")
    except (NoticesNotFound, OSError) as exc:
        log.error("%s", exc)
        return head + [f"(The attribution notices could not be read: {exc})"]
    return head + [line.expandtabs(4).rstrip() for line in text.splitlines()]
