"""JSON objects that name a key twice. json.loads keeps the last value of a repeated key and
silently drops the first; in a training record that loses a field's real value. The readers
parse with `ObjectsNotingDuplicateKeys` as object_pairs_hook, which marks such objects, and
reject the record by its line with `duplicate_key_reason`.
"""

from __future__ import annotations

from typing import Any


class ObjectsNotingDuplicateKeys:
    """object_pairs_hook for json.loads: builds each object as json does, but counts (and
    marks) the objects that name a key twice, whose first value json would silently drop."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict:
        record = dict(pairs)
        if len(record) == len(pairs):
            return record
        self.count += 1
        keys = [key for key, _ in pairs]
        repeated = next(key for i, key in enumerate(keys) if key in keys[:i])
        return ObjectWithDuplicateKey(record, repeated)


class ObjectWithDuplicateKey(dict):
    def __init__(self, record: dict, duplicate_key: str) -> None:
        super().__init__(record)
        self.duplicate_key = duplicate_key


def duplicate_key(value: Any) -> str | None:
    """The first key named twice in one object anywhere inside `value`, or None."""
    if isinstance(value, ObjectWithDuplicateKey):
        return value.duplicate_key
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return None
    for child in children:
        if (key := duplicate_key(child)) is not None:
            return key
    return None


def duplicate_key_reason(key: str | None) -> str:
    return (
        f"duplicate key '{key}' in a JSON object; JSON readers silently keep only the last "
        "value, so keep the one you mean and remove the other"
    )
