"""User-style predicates for `FilterRules.predicate`, loaded by tests/test_curate.py."""


def no_placeholder(conversation) -> bool | str:
    """Reject prompts with a TODO left in them, saying why."""
    if any("TODO" in m.content for m in conversation.messages if m.role == "user"):
        return "placeholder left in the prompt"
    return True


def reject_everything(conversation) -> bool:
    return False


def returns_none(conversation) -> None:
    return None


def raises(conversation) -> bool:
    raise KeyError("no such field")


NOT_A_FUNCTION = 3
