"""OpenAssistant message trees -> Conversations.

An OpenAssistant file (the oasst1/oasst2 exports) holds one record per message: `message_id`,
`parent_id` (null for the prompt that starts a tree), `role` ("prompter" or "assistant"),
`text`, and optionally `rank` (0: the best of its siblings), `lang` and `deleted`. One message
is no conversation, so `load_conversations` reads a whole file and hands its records here (the
`oasst` and `oasst_all` entries of formats.FORMATS let detection and the config know them).

- `oasst`: one conversation per tree, along its best-ranked path: from the prompt, at each
  message the reply with the lowest rank (unranked replies after ranked ones, ties to the
  first in the file), down to the deepest message reached that way.
- `oasst_all`: one conversation per root-to-leaf path.

A path ends with an assistant reply: a trailing prompt is dropped. A deleted message and every
reply under it are left out, and so is a prompt no one answered; both are counted. A
conversation's source is its last message's line, so a later error names a real line. A
message that is bad on its own (a missing or mistyped field, an unknown role, an id used twice,
a reply from the role it replies to), whose parent is not in the file, or that is under such a
message, is a DataError at its own line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sftforge.data.messages import Conversation, DataError, Message, Source, keys_of, type_name
from sftforge.data.readers import RawRecord

# Format name -> whether every root-to-leaf path becomes a conversation (else the best one).
TREE_FORMATS = {"oasst": False, "oasst_all": True}
ROLES = {"prompter": "user", "assistant": "assistant"}
ROLE_NAMES = {ours: theirs for theirs, ours in ROLES.items()}
DELETED = "deleted OpenAssistant messages, with the replies under them"
UNANSWERED = "OpenAssistant prompts with no reply"


@dataclass(frozen=True)
class _Node:
    id: str
    parent: str | None
    message: Message
    rank: float | None  # lower is better; None: unranked
    deleted: bool
    lang: str
    order: int  # position in the file: ties between equal ranks go to the first
    raw: RawRecord


@dataclass
class Trees:
    conversations: list[Conversation]
    rejected: list[tuple[DataError, RawRecord]]  # in file order
    left_out: Counter = field(default_factory=Counter)  # messages left out on purpose, by why


def conversations_from_trees(records: list[tuple[RawRecord, dict]], every_path: bool) -> Trees:
    """The conversations of one file's messages ((raw record, parsed record) pairs, in file
    order): each tree's best-ranked path, or with `every_path` each root-to-leaf path."""
    nodes: dict[str, _Node] = {}
    rejected: dict[int, tuple[DataError, RawRecord]] = {}  # by file order
    rejected_ids: dict[str, Source] = {}
    for order, (raw, record) in enumerate(records):
        try:
            node = _node(record, raw, order)
            if node.id in nodes or node.id in rejected_ids:
                first = nodes[node.id].raw.source if node.id in nodes else rejected_ids[node.id]
                reason = f"'{node.id}' is already the id of the message at {first}"
                raise DataError(raw.source, reason + "; ids must be unique", "message_id")
            nodes[node.id] = node
        except DataError as err:
            rejected[order] = (err, raw)
            if isinstance(record.get("message_id"), str):
                rejected_ids.setdefault(record["message_id"], raw.source)

    # Walk down from the prompts that start the trees: what is reached, kept or left out.
    replies: dict[str | None, list[_Node]] = {}
    for node in nodes.values():  # in file order
        replies.setdefault(node.parent, []).append(node)
    kept: set[str] = set()
    reached: set[str] = set()
    left_out: Counter = Counter()
    frontier = list(replies.get(None, []))
    while frontier:
        node = frontier.pop()
        reached.add(node.id)
        below = replies.get(node.id, [])
        if node.deleted:
            left_out[DELETED] += _mark_subtree(node, replies, reached)
            continue
        parent = nodes.get(node.parent)
        expected = "assistant" if parent and parent.message.role == "user" else "user"
        if node.message.role != expected:
            what = f"replies to a {ROLE_NAMES[parent.message.role]}" if parent else "starts a tree"
            reason = f"this message {what}, so it must be from the {ROLE_NAMES[expected]}"
            rejected[node.order] = (DataError(node.raw.source, reason, "role"), node.raw)
            continue
        kept.add(node.id)
        frontier.extend(below)
    for node in nodes.values():
        if node.id not in reached:
            rejected[node.order] = (_unplaced(node, nodes, rejected_ids), node.raw)

    # The conversations: paths through what is kept.
    tree = {parent: [n for n in below if n.id in kept] for parent, below in replies.items()}
    conversations = []
    for root in tree.get(None, []):
        paths = _every_path(root, tree) if every_path else [_best_path(root, tree)]
        ends = set()
        for path in paths:
            if path[-1].message.role == "user":
                path = path[:-1]  # a prompt with no reply: nothing to learn from it
            if path and path[-1].id not in ends:
                ends.add(path[-1].id)
                conversations.append(_conversation(path))
        if not ends:
            left_out[UNANSWERED] += 1
    return Trees(conversations, [rejected[k] for k in sorted(rejected)], left_out)


def _best_path(root: _Node, tree: dict[str | None, list[_Node]]) -> list[_Node]:
    path = [root]
    while below := tree.get(path[-1].id):
        path.append(min(below, key=lambda n: (n.rank is None, n.rank or 0, n.order)))
    return path


def _every_path(root: _Node, tree: dict[str | None, list[_Node]]) -> list[list[_Node]]:
    paths, stack = [], [[root]]
    while stack:
        path = stack.pop()
        below = tree.get(path[-1].id, [])
        if not below:
            paths.append(path)
        stack.extend([*path, reply] for reply in reversed(below))  # first reply first
    return paths


def _conversation(path: list[_Node]) -> Conversation:
    meta = {"format": "oasst", "message_ids": [n.id for n in path]}
    if path[0].lang:
        meta["lang"] = path[0].lang
    messages = tuple(n.message for n in path)
    return Conversation(source=path[-1].raw.source, messages=messages, meta=meta)


def _mark_subtree(node: _Node, replies: dict[str | None, list[_Node]], reached: set[str]) -> int:
    """Mark `node` and every message under it reached; their count."""
    stack, count = [node], 0
    while stack:
        current = stack.pop()
        reached.add(current.id)
        count += 1
        stack.extend(replies.get(current.id, []))
    return count


def _unplaced(node: _Node, nodes: dict[str, _Node], rejected_ids: dict[str, Source]) -> DataError:
    """Why a message no tree reaches is left out: its parent is missing, or itself left out."""
    parent = node.parent
    if parent in nodes or parent in rejected_ids:
        where = nodes[parent].raw.source if parent in nodes else rejected_ids[parent]
        reason = (
            f"its parent '{parent}' ({where}) is in no valid tree (it is rejected, under a "
            "rejected or orphan message, or in a cycle), so neither is this reply"
        )
    else:
        reason = (
            f"'{parent}' is the message_id of no message in this file: an orphan reply "
            "(a tree's messages must all be in one file)"
        )
    return DataError(node.raw.source, reason, "parent_id")


def _node(record: dict, raw: RawRecord, order: int) -> _Node:
    source = raw.source
    message_id = _string(record, "message_id", source)
    if "parent_id" not in record:
        raise DataError(source, f"missing; found keys {keys_of(record)}", "parent_id")
    parent = record["parent_id"]
    if parent is not None and not isinstance(parent, str):
        found = type_name(parent)
        reason = f"expected a message_id (a string), or null for a tree's prompt, found {found}"
        raise DataError(source, reason, "parent_id")
    role = _string(record, "role", source)
    if role not in ROLES:
        raise DataError(source, f"unknown role '{role}'; expected prompter or assistant", "role")
    text = _string(record, "text", source)
    if role == "assistant" and not text.strip():
        raise DataError(source, "empty assistant reply: nothing to learn", "text")
    rank = record.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        found = type_name(rank)
        reason = f"expected a number (0: the best of its siblings) or null, found {found}"
        raise DataError(source, reason, "rank")
    deleted = record.get("deleted")
    if deleted is not None and not isinstance(deleted, bool):
        reason = f"expected true, false or null, found {type_name(deleted)}"
        raise DataError(source, reason, "deleted")
    lang = record.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise DataError(source, f"expected a string or null, found {type_name(lang)}", "lang")
    message = Message(ROLES[role], text)
    return _Node(message_id, parent, message, rank, bool(deleted), lang or "", order, raw)


def _string(record: dict, key: str, source: Source) -> str:
    if key not in record:
        raise DataError(source, f"missing; found keys {keys_of(record)}", key)
    if not isinstance(value := record[key], str):
        raise DataError(source, f"expected a string, found {type_name(value)}", key)
    return value
