"""Text files written all or nothing (prepared data, reports): a reader sees the old files or the new."""

from __future__ import annotations

import os
import tempfile


def write_files(texts: dict[str, str]) -> None:
    """Write each ``path: text`` all or nothing: every text goes to a temporary file beside its path
    first, and only when all are written are they renamed over their paths (none is left behind on an
    error). The files get the usual permissions (the umask's), not a temporary file's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    temporaries: dict[str, str] = {}
    try:
        for path, text in texts.items():
            folder = os.path.dirname(os.path.abspath(path))
            with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as f:
                temporaries[path] = f.name
                f.write(text)
            os.chmod(f.name, 0o666 & ~umask)
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            if os.path.exists(temporary):
                os.remove(temporary)
