"""Reading a config: a YAML file, then keyword fields, then `key=value` overrides, merged in
that order and validated against the schema in config/schema.py; and writing one back."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from sftforge.config.schema import Config, ConfigKeyError
from sftforge.errors import InputError


class ConfigError(InputError):
    pass


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (training.lr=1e-4)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError) -> str:
    """One line per config key. A key of several types (training.lr: a number or auto) fails
    once per type; its line gives the first type's complaint and the other allowed words. A
    check across keys (ConfigKeyError) speaks for its key and those under it: its type
    matched."""
    lines: dict[str, str] = {}
    checks: dict[str, str] = {}
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"] if not _is_union_member(p)) or "config"
        cause = e.get("ctx", {}).get("error")
        allowed = e.get("ctx", {}).get("expected", "")
        if isinstance(cause, ConfigKeyError):
            checks[cause.key] = f"config key '{cause.key}': {cause.reason}"
        elif key in lines:  # another type of the same key
            if e["type"] == "literal_error":
                lines[key] += f"; or {allowed}"
        elif e["type"] == "extra_forbidden":
            lines[key] = f"unknown config key '{key}'"
        elif e["type"] == "literal_error":
            lines[key] = f"config key '{key}': {e['input']!r} is not allowed; expected {allowed}"
        else:
            lines[key] = f"config key '{key}': {e['msg']} (got {e.get('input')!r})"
    for checked in checks:
        lines = {k: line for k, line in lines.items() if not (k + ".").startswith(checked + ".")}
    return "\n".join([*checks.values(), *lines.values()])


def _is_union_member(part) -> bool:
    """pydantic names which type of a union failed in the error's location: `float`,
    `constrained-float`, `literal['auto']`; config keys are plain identifiers."""
    return isinstance(part, str) and (not part.isidentifier() or part in ("float", "int", "str"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the
    last, so a second `training:` section would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(
    path: str | Path | Config | None = None, overrides: list[str] | None = None, **fields
) -> Config:
    """The config of a YAML file at `path` (or a Config given, or the defaults), then keyword
    fields (nested sections as dicts, merged key by key), then `key=value` overrides."""
    tree: dict = {}
    if isinstance(path, Config):
        tree, path = path.model_dump(), None
    elif path is not None:
        try:
            tree = yaml.load(Path(path).read_text("utf-8"), _UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top")
    tree = _merge(tree, fields)
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(where + _describe(e)) from None


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(), sort_keys=False), "utf-8")


def parse_option(text: str, flag: str) -> tuple[str, object]:
    """KEY=VALUE given to `flag`, the value read as YAML (false, 3, text) as overrides are."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)
