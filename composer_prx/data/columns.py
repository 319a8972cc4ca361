"""The one caption-column rule, used by the converter (chooses) and the dataset (reads back).

A string column is a caption column when its lower-cased name is one of ``CAPTION_NAMES`` or has
the form ``*_caption`` / ``caption_*`` (``long_caption``, ``caption_llava``). Other string columns
(``url``, ``source``, ``license``, ...) are never captions. ``RESERVED`` names are the sample's own
fields and can never be caption columns, whatever the input or ``--caption-columns`` say.

The converter records its choice as ``caption_columns`` in ``buckets.json``; the dataset trains on
exactly those columns by default (equal weights). An MDS folder without ``buckets.json`` gets the
same rule applied to its ``index.json`` column names.
"""

from __future__ import annotations

CAPTION_NAMES = ("caption", "captions", "prompt", "text", "txt", "description", "alt_text", "alttext")
RESERVED = ("image", "width", "height", "source")


def is_caption_column(name: str) -> bool:
    """Whether a string column called ``name`` is a caption column by the rule above."""
    lowered = name.lower()
    if lowered in RESERVED or lowered.endswith(("_emb", "_mask")):
        return False
    return lowered in CAPTION_NAMES or lowered.endswith("_caption") or lowered.startswith("caption_")


def caption_columns_of(string_columns: list[str] | set[str]) -> list[str]:
    """The caption columns among ``string_columns``, sorted."""
    return sorted(c for c in set(string_columns) if is_caption_column(c))


def check_requested(columns: list[str] | tuple[str, ...]) -> None:
    """Reject explicitly requested caption columns that name a sample field."""
    bad = [c for c in columns if c.lower() in RESERVED or c.lower().endswith(("_emb", "_mask"))]
    if bad:
        raise ValueError(f"caption columns {bad} name sample fields ({', '.join(RESERVED)}, *_emb, *_mask); "
                         "choose the columns that hold caption text")
