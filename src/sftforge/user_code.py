"""A function of the user's, named as "package.module:function" (a scorer, a filter predicate)."""

from __future__ import annotations

import importlib


def import_user_function(spec: str | None, what: str, params: str, error: type[Exception]):
    """Import a user's "package.module:function". It is user code, so it is imported only
    when named; `what` names it in errors ("python scorer", "predicate"), `params` are the
    parameters it must take."""
    module_name, _, attribute = (spec or "").partition(":")
    if not module_name or not attribute:
        raise error(f"{what}: want 'package.module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise error(
            f"{what} {spec!r} could not be loaded ({e}); make the module importable "
            f"(installed or on PYTHONPATH) and define {attribute}({params})"
        ) from e
