"""Text compared as people read it: case and whitespace do not count."""

from __future__ import annotations


def normalize(text: str) -> str:
    """Casefold, collapse every whitespace run to one space, and strip.

    Punctuation is kept on purpose: "4." differs from "4", and "yes!" from "yes". Casefold (not
    lower) makes "Straße" equal "STRASSE".
    """
    return " ".join(text.casefold().split())
