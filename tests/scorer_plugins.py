"""User-style scorers for the `python` scorer kind, loaded by tests/test_scoring.py."""


def starts_with_reference(answer: str, reference: str, record: dict) -> bool:
    return answer.strip().startswith(reference.strip())


def word_overlap(answer: str, reference: str, record: dict) -> float:
    """Fraction of the reference's words that appear in the answer: partial credit."""
    wanted = reference.split()
    return sum(word in answer.split() for word in wanted) / len(wanted)


def mentions_record_keyword(answer: str, reference: str, record: dict) -> bool:
    return record["keyword"] in answer


def out_of_range(answer: str, reference: str, record: dict) -> float:
    return 2.0
