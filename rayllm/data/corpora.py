"""Real public-domain text that ships with packages on PyPI (no hub downloads at run time)."""

from __future__ import annotations

import sys
from pathlib import Path


def botchan_path() -> Path:
    """Natsume Soseki's "Botchan" in English (public domain), extracted by scripts/setup.sh from
    the sentencepiece 0.2.3 source distribution, which ships it as test data."""
    path = Path(sys.prefix) / "share" / "rayllm" / "botchan.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `bash scripts/setup.sh`, which extracts it from the sentencepiece sdist")
    return path
