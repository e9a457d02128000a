"""The one internal shape every demonstration takes: a Conversation of Messages.

Every loader in `data.py` produces these; `templates.py` renders them; `tokenize.py` turns
them into token ids and labels. A Conversation always knows where it came from, so any
later error can name the file and line (or row) of the record that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Source:
    """Where a record came from: a file and a 1-based line (JSONL/CSV) or 0-based row index."""

    path: str
    line: int | None = None  # 1-based line number in a text file (JSON lines, CSV)
    row: int | None = None  # 0-based index in a JSON array, Parquet file or `datasets` dataset

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path}[row {self.row}]"
        return self.path


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    """A validated demonstration.

    `messages` is a chat (system?, user, assistant, user, assistant, ...).
    `text` is set instead for raw-text records, which are trained on every token and not
    rendered through a chat template.
    """

    source: Source
    messages: tuple[Message, ...] = ()
    text: str | None = None
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def is_raw_text(self) -> bool:
        return self.text is not None

    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]


class DataError(ValueError):
    """A record that cannot become a valid Conversation. Names its source and field."""

    def __init__(self, source: Source | str, reason: str, field: str | None = None):
        self.source = source
        self.reason = reason
        self.field = field
        where = f"{source}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {reason}")
