"""Exact and near duplicates: the records to keep, and which kept one each dropped one repeats.

Records are compared after `scoring.normalize` (case and whitespace do not count), over the
whole conversation: every role and every content, the system prompt, reasoning and tool
results included, and each tool call's name and arguments (as JSON values: key order and
spacing aside, but case counts, since an argument is data a program reads).

- exact: the normalised conversations are equal, and so are the tools they offer and the
  template options;
- near: MinHash LSH (datasketch) over word shingles of the normalised text proposes
  candidates, and a candidate counts only when the MinHash estimate of the Jaccard
  similarity of the two shingle sets is at least `threshold`, so no record is dropped for a
  false positive of LSH; and only when the two make the same tool calls, with the same
  arguments: records differing in one argument teach different calls, however alike their
  words. (The tools' definitions are not shingled: long and shared across a dataset, they
  would make unrelated queries look alike.)

Records are read once, in input order. Each is compared with the records kept so far, so the
first record of a cluster is the one kept and every dropped record was measured against the
kept one it is reported with (a chain A ~ B ~ C with C unlike A keeps C). The MinHash
permutations use a fixed seed: the same data gives the same clusters every time.

Memory (DuplicateFinder, which `sftforge data dedup` and `stats` stream through): the kept
records' MinHashes and the LSH index, and one 16-byte digest per record; no text is held
beyond the record being hashed, and a dropped record is passed on as it is found (to the
report, or to stats' counters), not held. Measured at num_perm=128, threshold 0.85: about
3.8 KB per kept record (0.6 KB MinHash, about 3 KB in datasketch's in-memory index: 11 bands,
each a bytes key and a set) and about 0.1 KB per dropped one (its digest). So
1M distinct records take about 4 GB (5 GB at the peak, while dicts grow); num_perm=64 about
halves it. A kept record that calls tools holds a 16-byte digest of its calls too. About 0.15 ms per record on one core.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sftforge.data.messages import Conversation, Source
from sftforge.data.text import normalize
from sftforge.data.writers import write_jsonl
from sftforge.errors import InputError

if TYPE_CHECKING:
    from datasketch import LeanMinHash, MinHashLSH

SEED = 1  # of the MinHash permutations: fixed, so a dataset always deduplicates the same way
# How the LSH bands are chosen: weights of (false positives, false negatives). Every candidate
# is verified, so a false positive costs one comparison while a false negative keeps a
# duplicate. At threshold 0.85 (11 bands of 11 rows; datasketch's default (0.5, 0.5) takes 8)
# LSH proposes a pair of true Jaccard 0.85 about 85% of the time, and the pair is dropped
# only when its MinHash estimate reaches the threshold, a coin toss at a true 0.85. Measured
# through DuplicateFinder, 300 random pairs each (tests/test_curate.py): a pair of true
# Jaccard 0.80 / 0.85 / 0.90 / 0.95 is found 7 / 51 / 93 / 100% of the time (with the
# default weights: 3 / 33 / 76 / 98%).
LSH_WEIGHTS = (0.1, 0.9)

# What DuplicateFinder holds per distinct record at most, peaks included (as dicts and lists
# grow), by tracemalloc (tests/test_data_memory.py holds it to these; about 210-290 and 4,700-
# 4,900 measured): the exact search's digest and kept record's source, and the near search's
# MinHash and LSH index entries besides. A dropped duplicate adds nothing.
EXACT_INDEX_BYTES = 300
NEAR_INDEX_BYTES = 5_200


@dataclass(frozen=True)
class Duplicate:
    source: Source  # the dropped record
    kind: str  # "exact" (equal once normalised) or "near" (MinHash)
    similarity: float  # estimated Jaccard of the shingle sets with the kept record; exact: 1.0


@dataclass
class Cluster:
    kept: Source  # the cluster's first record in input order, the one kept
    dropped: list[Duplicate] = field(default_factory=list)  # in input order


@dataclass
class DedupResult:
    kept: list[Conversation]  # in input order (empty when they were written as found)
    # Those with a dropped record, in the input order of the kept one (empty when each
    # duplicate was passed on as found: DuplicateFinder's `on_duplicate`).
    clusters: list[Cluster]
    records: int  # conversations read
    threshold: float
    num_perm: int
    shingle: int
    exact: int = 0  # records dropped as exact duplicates
    near: int = 0  # and as near ones
    cluster_count: int = 0  # kept records with at least one dropped duplicate

    @property
    def dropped(self) -> list[Duplicate]:
        return [duplicate for cluster in self.clusters for duplicate in cluster.dropped]

    @property
    def counts(self) -> dict[str, int]:
        """records, kept, dropped, exact, near, clusters."""
        dropped = self.exact + self.near
        return {
            "records": self.records,
            "kept": self.records - dropped,
            "dropped": dropped,
            "exact": self.exact,
            "near": self.near,
            "clusters": self.cluster_count,
        }

    def summary(self) -> str:
        counts = self.counts
        return "\n".join(
            [
                f"records read: {counts['records']}",
                f"kept:         {counts['kept']}",
                f"dropped:      {counts['dropped']} (exact: {counts['exact']}, near: "
                f"{counts['near']}; in {counts['clusters']} clusters)",
                f"near means:   estimated Jaccard >= {self.threshold} over "
                f"{self.shingle}-word shingles (num_perm {self.num_perm})",
            ]
        )


def find_duplicates(
    conversations: Iterable[Conversation],
    threshold: float = 0.85,
    num_perm: int = 128,
    shingle: int = 5,
) -> DedupResult:
    """Keep the first record of each cluster of exact or near duplicates; see the module doc.

    `threshold` is the estimated Jaccard similarity (of `shingle`-word shingle sets) at or
    above which two records are near duplicates; `num_perm` is the number of MinHash
    permutations (more: a finer estimate, more memory).
    """
    finder = DuplicateFinder(threshold, num_perm, shingle)
    kept = [conversation for conversation in conversations if finder.keeps(conversation)]
    return finder.result(kept)


class DuplicateFinder:
    """`find_duplicates` one record at a time, holding no record: `keeps(conversation)` says
    whether it is kept (the first of its cluster so far). Each dropped record goes, with the
    source of the kept one it repeats, to `on_duplicate` when given (and is not held), else
    into the clusters `result` gives. `near=False` looks for exact duplicates only: no MinHash, no index, about 0.2 KB a record
    where the near search takes about 5 KB (see the module's docstring)."""

    def __init__(
        self,
        threshold: float = 0.85,
        num_perm: int = 128,
        shingle: int = 5,
        near: bool = True,
        on_duplicate: Callable[[Duplicate, Source], object] | None = None,
    ) -> None:
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self.near = near
        # datasketch (with scipy) is imported here, by the finder alone: a training process
        # that never looks for near duplicates starts 0.5 s sooner.
        from datasketch import MinHash

        self._index = _lsh_index(threshold, num_perm, shingle)
        self._blank = MinHash(num_perm=num_perm, seed=SEED)
        self._kept_sources: list[Source] = []
        self._minhashes: list[LeanMinHash] = []  # of the kept records, by position
        self._calls: list[bytes | None] = []  # digest of their tool calls (None: no calls)
        # normalised-conversation digest -> the position of the kept record it resolves to:
        # that record's own, or (position, similarity) for a near duplicate of it
        self._seen: dict[bytes, int | tuple[int, float]] = {}
        self._clusters: dict[int, Cluster] = {}
        self.on_duplicate = on_duplicate
        self._has_duplicate = bytearray()  # per kept record: 1 once one of it was dropped
        self.records = self.exact = self.near_count = 0

    def keeps(self, conversation: Conversation) -> bool:
        self.records += 1
        parts = _normalised(conversation)
        whole = [parts, conversation.tools, conversation.template_options]
        digest = _digest(json.dumps(whole, sort_keys=True, default=str))
        if digest in self._seen:
            # An exact repeat of a kept record, or of one dropped as a near duplicate: then it
            # is as near to that one's kept record as that one was.
            seen = self._seen[digest]
            position, kind, similarity = (
                (seen, "exact", 1.0) if isinstance(seen, int) else (seen[0], "near", seen[1])
            )
        elif not self.near:
            self._seen[digest] = len(self._kept_sources)
            self._keep(conversation)
            return True
        else:
            minhash = self._blank.copy()
            minhash.update_batch(_shingles(parts, self.shingle))
            minhash = _lean(minhash)
            calls = _calls_digest(parts)
            candidates = [p for p in self._index.query(minhash) if self._calls[p] == calls]
            match = _closest(minhash, candidates, self._minhashes, self.threshold)
            if match is None:
                position = len(self._kept_sources)
                self._seen[digest] = position
                self._index.insert(position, minhash)
                self._minhashes.append(minhash)
                self._calls.append(calls)
                self._keep(conversation)
                return True
            position, similarity = match
            kind = "near"
            self._seen[digest] = (position, similarity)
        self._drop(Duplicate(conversation.source, kind, similarity), position)
        return False

    def _keep(self, conversation: Conversation) -> None:
        self._kept_sources.append(conversation.source)
        self._has_duplicate.append(0)

    def _drop(self, duplicate: Duplicate, position: int) -> None:
        if duplicate.kind == "exact":
            self.exact += 1
        else:
            self.near_count += 1
        self._has_duplicate[position] = 1
        kept = self._kept_sources[position]
        if self.on_duplicate is not None:
            self.on_duplicate(duplicate, kept)
        else:
            self._clusters.setdefault(position, Cluster(kept)).dropped.append(duplicate)

    def result(self, kept: list[Conversation]) -> DedupResult:
        """The counts and the clusters found so far (none held when `on_duplicate` took
        each duplicate), with `kept`: the kept records when the caller kept them (it may have
        written them out instead)."""
        ordered = [self._clusters[position] for position in sorted(self._clusters)]
        threshold = self.threshold if self.near else 1.0
        found = DedupResult(kept, ordered, self.records, threshold, self.num_perm, self.shingle)
        found.exact, found.near = self.exact, self.near_count
        found.cluster_count = sum(self._has_duplicate)
        return found


def write_dedup_report(result: DedupResult, report_path: str | Path) -> None:
    """One `report_line` per dropped record, cluster by cluster."""
    write_jsonl(
        report_path,
        (
            report_line(duplicate, cluster.kept)
            for cluster in result.clusters
            for duplicate in cluster.dropped
        ),
    )


def report_line(duplicate: Duplicate, kept: Source) -> dict:
    """{"dropped": "file:line", "kept": "file:line", "kind", "similarity"}."""
    return {
        "dropped": str(duplicate.source),
        "kept": str(kept),
        "kind": duplicate.kind,
        "similarity": round(duplicate.similarity, 4),
    }


def shingles(conversation: Conversation, size: int = 5) -> set[bytes]:
    """The set of `size`-word shingles `find_duplicates` compares: the normalised words of the
    conversation, each turn led by its role as a word (<user>, <assistant>, ...), reasoning by
    <reasoning>, each tool call by <call>."""
    return set(_shingles(_normalised(conversation), size))


def _normalised(conversation: Conversation) -> list[tuple[str, str]]:
    """(label, text) of each part compared: per message its reasoning, its role and content,
    then each tool call as "name {arguments as JSON, keys sorted}" (not normalised)."""
    if conversation.is_raw_text:
        return [("text", normalize(conversation.text))]
    parts = []
    for message in conversation.messages:
        if message.reasoning is not None:
            parts.append(("reasoning", normalize(message.reasoning)))
        parts.append((message.role, normalize(message.content)))
        for call in message.tool_calls:
            arguments = json.dumps(call.arguments, sort_keys=True, ensure_ascii=False, default=str)
            parts.append(("call", f"{call.name} {arguments}"))
    return parts


def _calls_digest(parts: list[tuple[str, str]]) -> bytes | None:
    calls = [text for label, text in parts if label == "call"]
    return _digest(json.dumps(calls)) if calls else None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _shingles(parts: list[tuple[str, str]], size: int) -> list[bytes]:
    words = [word for role, text in parts for word in (f"<{role}>", *text.split())]
    if len(words) <= size:  # shorter than one shingle: the whole text is the one shingle
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)]


def _closest(
    minhash: LeanMinHash, candidates: list[int], minhashes: list[LeanMinHash], threshold: float
) -> tuple[int, float] | None:
    """(position, similarity) of the most similar kept record at or above `threshold` among
    the `candidates` LSH proposed, the earliest of equals; None when none really is that
    similar."""
    best = None
    for position in candidates:
        similarity = minhashes[position].jaccard(minhash)
        if similarity >= threshold and (best is None or (similarity, -position) > best):
            best = (similarity, -position)
    return None if best is None else (-best[1], best[0])


def _lean(minhash):
    from datasketch import LeanMinHash

    return LeanMinHash(minhash)


def _lsh_index(threshold: float, num_perm: int, shingle: int) -> MinHashLSH:
    from datasketch import MinHashLSH

    if not 0 < threshold <= 1:
        raise InputError(f"threshold must be a Jaccard similarity in (0, 1], not {threshold}")
    if shingle < 1:
        raise InputError(f"shingle is a number of words, at least 1, not {shingle}")
    if num_perm < 2:
        raise InputError(f"num_perm must be at least 2 (128 is usual), not {num_perm}")
    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    except ValueError as e:  # e.g. too few bands for a threshold this high
        raise InputError(
            f"no LSH index for threshold={threshold} with num_perm={num_perm} ({e}); "
            "raise num_perm or lower the threshold"
        ) from e
