"""Export runs to GGUF and run them in llama.cpp: does the deployed model answer as the run does?

    make llama-cpp                                   # once: builds llama.cpp (about 5 minutes)
    .venv/bin/python bench/llamacpp_check.py runs/demo [RUN ...] [--quants f16,q8_0,q4_k_m]

For each run and type: `sftforge.export` (with its read-back check), then llama.cpp, through
llama-cpp-python, loads the file and answers the run's held-out prompts with the file's
embedded chat template, greedily, up to the run's eval.max_new_tokens; transformers answers
the same prompts from the run itself. Reported per run and type: file size, export seconds,
the check's mean KL and top-1 agreement, whether llama.cpp's prompt tokens equal the run's,
each side's score with the run's scorer (eval.scorer, else exact match), the share of
identical answers, and the share of llama.cpp's answers that ended at an end-of-turn token
(finish_reason "stop") rather than at the token limit. A file export's check refuses is
answered too, and marked: what the check kept from users. One `RESULT {json}` line per run
and type, and a table at the end."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from sftforge import evaluate, export
from sftforge.config.loading import load_config
from sftforge.data.loading import load_conversations
from sftforge.encode.slots import template_messages
from sftforge.evaluation.generation import prompt_and_reference
from sftforge.evaluation.scoring import make_scorer
from sftforge.export.verify import ExportCheckFailed
from sftforge.models.tokenizer import load_tokenizer, text_side


def llama_cpp_answers(path: Path, conversations, max_new_tokens: int):
    """([{answer, finish}], prompt token ids) from llama.cpp."""
    import llama_cpp

    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(
        str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    rows = []
    for conversation in conversations:
        prompt, _ = prompt_and_reference(conversation)
        messages = template_messages(tuple(prompt.messages))
        reply = llm.create_chat_completion(
            messages=messages,
            temperature=0.0,
            repeat_penalty=1.0,
            max_tokens=max_new_tokens,
        )
        choice = reply["choices"][0]
        rows.append({"answer": choice["message"]["content"], "finish": choice["finish_reason"]})
    prompt_tokens = [
        llm.tokenize(text.encode(), add_bos=False, special=True)
        for text in _rendered(llm, conversations)
    ]
    return rows, prompt_tokens


def _rendered(llm, conversations) -> list[str]:
    """Each prompt as llama-cpp-python's chat handler renders it from the file's template
    (it adds no BOS of its own: the template writes it)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode() if token >= 0 else ""

    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], text(llm.token_eos()), text(llm.token_bos())
    )
    prompts = [tuple(prompt_and_reference(c)[0].messages) for c in conversations]
    return [formatter(messages=template_messages(messages)).prompt for messages in prompts]


def check_run(run: Path, quants: list[str], limit: int | None, scratch: Path) -> list[dict]:
    config = load_config(run / "sftforge.yaml")
    held_out = config.eval.held_out
    if not isinstance(held_out, str):
        raise SystemExit(f"{run}: eval.held_out is not a file; this check answers its prompts")
    conversations = [c for c in load_conversations(held_out).conversations if c.assistant_indices()]
    conversations = conversations[:limit]
    scorer_spec = config.eval.scorer or {"kind": "exact"}
    scorer = make_scorer(scorer_spec)
    max_new_tokens = config.eval.max_new_tokens

    started = time.perf_counter()
    reference_rows = evaluate(
        run, held_out, scorer=scorer_spec, limit=len(conversations), max_new_tokens=max_new_tokens
    ).results
    transformers_seconds = time.perf_counter() - started
    transformers_score = sum(r["score"] for r in reference_rows) / len(reference_rows)
    encoder, _ = text_side(load_tokenizer(str(run)), "auto")
    run_prompt_tokens = [
        list(encoder.encode_prompt(prompt_and_reference(c)[0].messages)) for c in conversations
    ]

    results = []
    for quant in quants:
        target = scratch / f"{run.name}-{quant}.gguf"
        try:
            done = export(run, quant=quant, output=target, overwrite=True)
            path, verification, refused = done.path, done.verification, None
        except ExportCheckFailed as failure:  # answered anyway: what the check kept from users
            path, refused = target.with_name(target.name + ".failed"), failure
            verification = failure.verification
            print(f"  refused by the check: {failure}")
        started = time.perf_counter()
        rows, prompt_tokens = llama_cpp_answers(path, conversations, max_new_tokens)
        llama_seconds = time.perf_counter() - started
        scores = [
            float(scorer(row["answer"], reference["reference"], {"prompt": reference["prompt"]}))
            for row, reference in zip(rows, reference_rows, strict=True)
        ]
        same = [
            row["answer"].strip() == reference["answer"].strip()
            for row, reference in zip(rows, reference_rows, strict=True)
        ]
        result = {
            "run": str(run),
            "quant": quant,
            "refused_by_check": refused is not None,
            "size_mib": round(path.stat().st_size / 2**20, 1),
            "export_seconds": round(done.seconds, 1) if refused is None else None,
            "mean_kl": verification.mean_kl,
            "top1_agreement": round(verification.top1_agreement, 4),
            "prompts": len(conversations),
            "prompt_tokens_equal": sum(
                a == b for a, b in zip(prompt_tokens, run_prompt_tokens, strict=True)
            ),
            "scorer": scorer_spec if isinstance(scorer_spec, dict) else scorer_spec.kind,
            "transformers_score": round(transformers_score, 4),
            "llama_cpp_score": round(sum(scores) / len(scores), 4),
            "identical_answers": round(sum(same) / len(same), 4),
            "stopped_at_end_of_turn": round(
                sum(row["finish"] == "stop" for row in rows) / len(rows), 4
            ),
            "transformers_seconds": round(transformers_seconds, 1),
            "llama_cpp_seconds": round(llama_seconds, 1),
        }
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)
        differing = [
            (reference["prompt"], reference["answer"], row["answer"], row["finish"])
            for row, reference, equal in zip(rows, reference_rows, same, strict=True)
            if not equal
        ]
        for prompt, theirs, ours, finish in differing[:3]:
            print(f"  differs: {prompt[:60]!r}\n    transformers: {theirs!r}\n"
                  f"    llama.cpp ({finish}): {ours!r}")  # fmt: skip
        path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    parser.add_argument("--limit", type=int, default=None, help="held-out prompts per run")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-check-") as scratch:
        for run in args.runs:
            results += check_run(run, args.quants.split(","), args.limit, Path(scratch))
    print()
    print(
        "| run | type | refused | MiB | export s | mean KL | top-1 | prompt tokens equal | "
        "transformers score | llama.cpp score | identical | stopped at end of turn |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {Path(r['run']).name} | {r['quant']} | {'yes' if r['refused_by_check'] else 'no'} | "
            f"{r['size_mib']} | {r['export_seconds']} | "
            f"{r['mean_kl']:.2g} | {r['top1_agreement']:.1%} | "
            f"{r['prompt_tokens_equal']}/{r['prompts']} | {r['transformers_score']:.1%} | "
            f"{r['llama_cpp_score']:.1%} | {r['identical_answers']:.1%} | "
            f"{r['stopped_at_end_of_turn']:.1%} |"
        )


if __name__ == "__main__":
    main()
