"""Mistral's own tokenizer files, for a folder that holds no tokenizer.json: `tekken.json`
(Mistral's tiktoken-style vocabulary, Nemo and later) and SentencePiece `tokenizer.model.vN`
(v1, v2, v3, v7, as mistral-common ships them). Each is read into a transformers tokenizer
that tokenizes as mistral-common does: tekken through transformers' own converter, the
SentencePiece files as Llama-style tokenizers (v1 "legacy", a prefix space after every
special token, as mistral-common's v1 writes its plain-text [INST]).

The file's version is kept in the tokenizer's settings (`mistral_version`, saved with it in
tokenizer_config.json), for the version's layout cannot always be told from the vocabulary
(a v3 tekken.json holds [SYSTEM_PROMPT] too). The tokenizer gets no chat template:
`template: auto` (or `mistral`) then takes the built-in of the file's version
(encode/families.py), which tests/test_reference_templates.py proves token for token against
mistral-common, and each example is checked against it again (`mistral_common_proof`)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from sftforge.encode.families import MISTRAL_VERSION_KEY

# The Mistral file a tokenizer was read from, kept with its settings: mistral-common checks
# each example against it (`mistral_common_proof`).
MISTRAL_FILE_KEY = "mistral_common_file"

TEKKEN_FILE = "tekken.json"
_SENTENCEPIECE_FILE = re.compile(r"\.model\.v(\d+)(m\d+)?$")


def mistral_tokenizer_file(folder: Path) -> Path | None:
    """The Mistral tokenizer file to read in `folder` (or `folder` itself, such a file), where
    there is no tokenizer.json to prefer: tekken.json first, else the newest
    tokenizer.model.vN."""
    if folder.is_file():
        tekken = folder.name.startswith("tekken") and folder.suffix == ".json"
        is_mistral = tekken or _SENTENCEPIECE_FILE.search(folder.name)
        return folder if is_mistral else None
    if not folder.is_dir() or (folder / "tokenizer.json").is_file():
        return None
    if (folder / TEKKEN_FILE).is_file():
        return folder / TEKKEN_FILE
    versioned = [p for p in folder.iterdir() if _SENTENCEPIECE_FILE.search(p.name)]
    if not versioned:
        return None
    return max(versioned, key=lambda p: int(_SENTENCEPIECE_FILE.search(p.name).group(1)))


def sentencepiece_version(path: Path) -> int:
    found = _SENTENCEPIECE_FILE.search(path.name)
    return int(found.group(1)) if found else 1


def load_mistral_tokenizer(path: Path):
    """A transformers tokenizer read from a Mistral tokenizer file (`mistral_tokenizer_file`)."""
    if path.name.endswith(".json"):
        from transformers.integrations.mistral import convert_tekken_tokenizer

        # An empty template: the built-in of the file's version is chosen, and said, by `auto`.
        tokenizer = convert_tekken_tokenizer(str(path), chat_template="")
        tokenizer.chat_template = None
        version = json.loads(path.read_text("utf-8"))["config"].get("version", "v3")
        tokenizer.init_kwargs[MISTRAL_VERSION_KEY] = int(version.lstrip("v").split("m")[0])
        tokenizer.init_kwargs[MISTRAL_FILE_KEY] = str(path.resolve())
        return tokenizer
    from transformers import LlamaTokenizer

    # transformers reads a SentencePiece model only under the name tokenizer.model.
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(path, Path(folder) / "tokenizer.model")
        version = sentencepiece_version(path)
        tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=version == 1)
    tokenizer.init_kwargs[MISTRAL_VERSION_KEY] = version
    tokenizer.init_kwargs[MISTRAL_FILE_KEY] = str(path.resolve())
    return tokenizer


def mistral_common_proof(tokenizer, template_name: str):
    """The reference check each example gets where the tokenizer was read from Mistral's own
    file (still there) and the template is the built-in of its version: mistral-common's
    encoder of that file. None where there is none."""
    from sftforge.encode.families import MISTRAL_VERSIONS
    from sftforge.encode.reference import MistralCommonReference, ReferenceProof

    path = tokenizer.init_kwargs.get(MISTRAL_FILE_KEY)
    if template_name not in MISTRAL_VERSIONS or not path or not Path(path).is_file():
        return None
    try:
        return ReferenceProof(MistralCommonReference(path))
    except ImportError:
        return None  # mistral-common is not installed: pip install sftforge[mistral]
