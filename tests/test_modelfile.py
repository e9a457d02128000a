"""The Ollama Modelfile's TEMPLATE writes what the run's chat template writes.

Each built-in family's Go template is rendered by Go's own text/template (the engine Ollama
uses) through tests/ollama_template/render.go, which hands it .Messages as Ollama's chat
endpoint does (the Modelfile's SYSTEM first when a conversation has no system message), and
compared with the family's Jinja template on conversations of every shape. Ollama adds the
BOS token itself where the file asks for one, so the Jinja text is compared without it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sftforge.data.messages import Message
from sftforge.encode.slots import template_messages
from sftforge.encode.templates import BUILTIN_TEMPLATES, ChatTemplate, builtin_template_source
from sftforge.export.modelfile import GO_TEMPLATES, match_family
from sftforge.export.verify import PROBES

EOS = "</s>"
BOS_OF = {
    "llama3": "<|begin_of_text|>",
    "llama3.1": "<|begin_of_text|>",
    "gemma": "<bos>",
}  # the others: "<s>"
CONVERSATIONS = (
    *PROBES,
    (
        Message("system", "Answer in French."),
        Message("user", "Hello"),
        Message("assistant", "Bonjour"),
        Message("user", "How are you?"),
    ),
    (
        Message("user", "Line one\nline two"),
        Message("assistant", "Two lines:\n- one\n- two"),
        Message("user", 'Quote "this" & {{ that }}'),
    ),
)


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory) -> Path:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go): Ollama's template engine")
    source = Path(__file__).parent / "ollama_template/render.go"
    binary = tmp_path_factory.mktemp("go") / "render"
    subprocess.run(["go", "build", "-o", str(binary), str(source)], check=True, timeout=300)
    return binary


def render_go(binary: Path, template: str, system: str | None, messages) -> str:
    request = {"template": template, "system": system or "", "messages": messages}
    done = subprocess.run(
        [str(binary)], input=json.dumps(request), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_builtin_family_has_a_go_template():
    assert set(GO_TEMPLATES) == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("family", BUILTIN_TEMPLATES)
def test_go_template_renders_what_the_jinja_template_renders(family, go_renderer):
    bos = BOS_OF.get(family, "<s>")
    jinja = ChatTemplate(family, builtin_template_source(family), bos, EOS)
    matched, system = match_family(jinja)
    assert matched == family
    go = GO_TEMPLATES[family].replace("BOS", bos).replace("EOS", EOS)
    for conversation in CONVERSATIONS:
        messages = template_messages(conversation)
        expected = jinja.render(messages, add_generation_prompt=True).removeprefix(bos)
        assert render_go(go_renderer, go, system, messages) == expected, conversation


def test_a_template_with_a_default_system_prompt_matches_its_family_with_a_system_line():
    source = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
        "{% endif %}" + builtin_template_source("chatml")
    )
    assert match_family(ChatTemplate("own", source, "", "<|im_end|>")) == ("chatml", "Be kind.")


def test_a_template_no_family_writes_matches_none():
    source = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    assert match_family(ChatTemplate("own", source, "", "")) == (None, None)
