"""Choosing and rendering chat templates: sandboxed, named errors, inspect output."""

import pytest

from sftforge.cli.main import main
from sftforge.encode.templates import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    TemplateError,
    resolve_template,
)


def test_template_cannot_reach_python_internals():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        ChatTemplate("evil", escape).render([])


def test_template_cannot_mutate_the_messages_it_is_given():
    template = ChatTemplate("mutating", "{{ messages.append({'role': 'user'}) }}")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError):
        template.render(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_auto_uses_the_tokenizers_own_template(smollm2_tokenizer):
    template = resolve_template("auto", smollm2_tokenizer)
    assert template.name == "tokenizer"
    assert template.source == smollm2_tokenizer.chat_template


def test_auto_falls_back_to_chatml_when_the_tokenizer_has_none(smollm2_tokenizer):
    smollm2_tokenizer.chat_template = None
    assert resolve_template("auto", smollm2_tokenizer).name == "chatml"


def test_unknown_template_name_lists_the_choices(smollm2_tokenizer):
    with pytest.raises(TemplateError) as e:
        resolve_template("chatgpt", smollm2_tokenizer)
    assert all(name in str(e.value) for name in BUILTIN_TEMPLATES)


def test_a_jinja_file_can_be_the_template(tmp_path, smollm2_tokenizer):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    template = resolve_template(str(path), smollm2_tokenizer)
    assert template.render([{"role": "user", "content": "abc"}]) == "abc"


def test_invalid_jinja_is_reported_with_the_template_name(tmp_path, smollm2_tokenizer):
    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}")
    with pytest.raises(TemplateError, match="broken.jinja"):
        resolve_template(str(path), smollm2_tokenizer)


def test_inspect_marks_trained_tokens_and_counts_them(tmp_path, smollm2_tokenizer_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
    )
    assert main(["inspect", str(data), "--model", smollm2_tokenizer_path, "--plain"]) == 0
    out = capsys.readouterr().out
    assert "[[Hello|<|im_end|>|]]" in out
    assert "tokens: " in out and "trained tokens: 2" in out
    assert f"{data}:1" in out
