"""An Ollama Modelfile for an exported GGUF: `FROM` the file, a Go `TEMPLATE` that writes
what the run's chat template writes, a `PARAMETER stop` for each token the run was taught to
stop at, and the run's generation defaults.

Ollama's templates are Go templates, not Jinja, so each built-in family has its Go twin
here. A run's template is matched to a family by rendering the same conversations with both
(a template that adds a default system prompt, as SmolLM2's own does, becomes the family's
template and a `SYSTEM` line); a template that matches none gets no TEMPLATE, and the
Modelfile says so. Ollama adds the BOS token itself where the file asks for one, so the Go
templates do not write the leading one."""

from __future__ import annotations

from dataclasses import dataclass

from sftforge.data.messages import Message
from sftforge.encode.encoder import Encoder
from sftforge.encode.slots import template_messages
from sftforge.encode.templates import ChatTemplate, TemplateError, builtin_template_source
from sftforge.export.verify import PROBES
from sftforge.export.vocabulary import Vocabulary

# Go templates over Ollama's .Messages (Role, Content). BOS and EOS stand for the tokens.
_SYSTEM = '{{- $system := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}\n'
# The index of the last user message ($last): Mistral v2/v3 put the system prompt there.
_LAST_USER = '{{- $last := -1 }}{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ $last = $i }}{{ end }}{{ end }}\n'


def _mistral_go(space: str, system_tokens: bool) -> str:
    """Mistral v3/v7's Go twin: `space` after each opening control token and before an
    answer (" " for SentencePiece, "" for tekken); the system prompt between its own tokens
    (v7), else before the last user message's text (v2/v3)."""
    if system_tokens:
        head = f"{{{{- if $system }}}}[SYSTEM_PROMPT]{space}{{{{ $system }}}}[/SYSTEM_PROMPT]{{{{ end }}}}\n"
        system = ""
    else:
        head = _LAST_USER
        system = "{{ if and (eq $i $last) $system }}{{ $system }}\n\n{{ end }}"
    return (
        _SYSTEM
        + head
        + f"""{{{{- range $i, $m := .Messages }}}}
{{{{- if eq .Role "user" }}}}[INST]{space}{system}{{{{ .Content }}}}[/INST]
{{{{- else if eq .Role "assistant" }}}}{space}{{{{ .Content }}}}EOS
{{{{- end }}}}
{{{{- end }}}}"""
    )


GO_TEMPLATES = {
    "chatml": """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
""",
    "llama3": """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""",
    "llama3.1": _SYSTEM
    + """{{- "" }}<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ $system }}<|eot_id|>
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ if eq .Role "tool" }}ipython{{ else }}{{ .Role }}{{ end }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""",
    "phi3": """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
""",
    "zephyr": """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}EOS
{{ end }}<|assistant|>
""",
    "gemma": _SYSTEM
    + """{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ $first = false }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
""",
    "mistral-v1": _SYSTEM
    + """{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $first $system }}{{ $system }}

{{ end }}{{ $first = false }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}EOS
{{- end }}
{{- end }}""",
    "mistral-v3": _mistral_go(" ", system_tokens=False),
    "mistral-v3-tekken": _mistral_go("", system_tokens=False),
    "mistral-v7": _mistral_go(" ", system_tokens=True),
    "mistral-v7-tekken": _mistral_go("", system_tokens=True),
    "deepseek": _SYSTEM
    + """{{- $system }}
{{- range .Messages }}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>
{{- end }}
{{- end }}<｜Assistant｜>""",
    "llama2": _SYSTEM
    + """{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}{{ if not $first }}BOS{{ end }}[INST] {{ if and $first $system }}<<SYS>>
{{ $system }}
<</SYS>>

{{ end }}{{ $first = false }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }} EOS
{{- end }}
{{- end }}""",
    "vicuna": """{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }} {{ end }}{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}USER: {{ .Content }} {{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}EOS{{ end }}
{{- end }}ASSISTANT:""",
    "alpaca": """{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}

{{ end }}{{ end }}
{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}{{ if not $first }}

{{ end }}{{ $first = false }}### Instruction:
{{ .Content }}

{{ else if eq .Role "assistant" }}### Response:
{{ .Content }}EOS{{ end }}
{{- end }}### Response:
""",
}
# The system prompt the built-in writes when a conversation has none: a SYSTEM line.
_DEFAULT_SYSTEM_OF = {
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions.",
    "alpaca": "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.",
}
_MARK = "\x00system\x00"


@dataclass
class Modelfile:
    text: str
    family: str | None  # the built-in family whose Go template it uses, or None
    system: str | None  # a default system prompt (SYSTEM line)
    notes: list[str]


def modelfile_for(
    encoder: Encoder, vocabulary: Vocabulary, gguf_name: str, defaults: dict
) -> Modelfile:
    """The Modelfile for `gguf_name` (a file beside it), from the run's encoder."""
    template = encoder.template
    notes: list[str] = []
    family, system = match_family(template)
    lines = [
        "# Ollama Modelfile written by sftforge: ollama create NAME -f THIS_FILE",
        f"FROM ./{gguf_name}",
    ]
    if family is None:
        notes.append(
            f"no TEMPLATE: the run's template ({template.name}) matches none of the built-in "
            "families with a Go equivalent, so Ollama picks one from the file's embedded "
            "template; check its prompts, or use llama.cpp, which runs the embedded template"
        )
        lines.append("# " + notes[-1])
    else:
        go = (
            GO_TEMPLATES[family]
            .replace("BOS", template.bos_token)
            .replace("EOS", template.eos_token)
        )
        lines.append(f'TEMPLATE """{go}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
        if "tools" in template.source:
            notes.append(
                "the TEMPLATE leaves tools out: Ollama writes tool definitions as compact JSON "
                "and the run's template as Python's json.dumps, so tool prompts would differ "
                "from training; for tool calls use llama.cpp with its embedded template "
                "(llama-server --jinja)"
            )
            lines.append("# " + notes[-1])
    tokenizer = encoder.tokenizer
    for stop_id in encoder.stop_ids:
        lines.append(f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(stop_id)}"')
    lines.append(f"PARAMETER temperature {defaults.get('temperature', 0.0):g}")
    if defaults.get("num_predict"):
        lines.append(f"PARAMETER num_predict {defaults['num_predict']}")
    return Modelfile("\n".join(lines) + "\n", family, system, notes)


def match_family(template: ChatTemplate) -> tuple[str | None, str | None]:
    """(family, default system prompt) of the built-in whose rendering equals `template`'s
    on the test conversations, or (None, None)."""
    for family in GO_TEMPLATES:
        builtin = ChatTemplate(
            family, builtin_template_source(family), template.bos_token, template.eos_token
        )
        system = _matches(template, builtin)
        if system is not False:
            return family, system if system is not None else _DEFAULT_SYSTEM_OF.get(family)
    return None, None


def _matches(template: ChatTemplate, builtin: ChatTemplate) -> str | None | bool:
    """None: they render alike; a string: alike once the builtin is given that system
    prompt where the conversation has none; False: they differ."""
    default_system = None
    for probe in PROBES:
        messages = template_messages(probe)
        try:
            ours = template.render(messages, add_generation_prompt=True)
            theirs = builtin.render(messages, add_generation_prompt=True)
        except TemplateError:
            return False
        if ours == theirs:
            continue
        if probe[0].role == "system":
            return False
        with_mark = template_messages((Message("system", _MARK), *probe))
        before, _, after = builtin.render(with_mark, add_generation_prompt=True).partition(_MARK)
        if not (ours.startswith(before) and ours.endswith(after)):
            return False
        system = ours[len(before) : len(ours) - len(after)]
        if default_system not in (None, system):
            return False
        default_system = system
    return default_system
