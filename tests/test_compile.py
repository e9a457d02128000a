"""torch.compile of the decoder layers: compiled at the start, and a failing compiler
falls back to eager execution with the reason, instead of failing the first step."""

import torch
from test_loss import VOCAB, random_examples

from sftforge.encode.batches import collate
from sftforge.models.loading import compile_decoder_layers
from sftforge.models.loss import TokenLoss


def test_a_compiler_that_fails_is_reported_and_the_model_still_runs_eagerly(tiny_model_factory):
    model, reference = tiny_model_factory(VOCAB), tiny_model_factory(VOCAB)
    batch = collate(random_examples(3, seed=1), 0)
    calls = []

    def broken_compiler(graph, example_inputs):
        calls.append(graph)
        raise RuntimeError("no compiler here")

    def probe():
        TokenLoss(model)(batch.input_ids, batch.labels).backward()

    torch.manual_seed(5)
    failure = compile_decoder_layers(model, probe, backend=broken_compiler)
    after_probe = torch.rand(1)

    assert calls, "the probe did not reach the compiler"
    assert "no compiler here" in failure
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after_probe)  # the probe left the generator alone
    with torch.compiler.set_stance("force_eager"):
        loss = TokenLoss(model)(batch.input_ids, batch.labels)
    assert float(loss) == float(TokenLoss(reference)(batch.input_ids, batch.labels))


def test_a_working_compiler_reports_nothing(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    batch = collate(random_examples(3, seed=1), 0)
    seen = []

    def recording_compiler(graph, example_inputs):
        seen.append(graph)
        return graph.forward  # run the captured graph as it is

    failure = compile_decoder_layers(
        model,
        lambda: TokenLoss(model)(batch.input_ids, batch.labels).backward(),
        backend=recording_compiler,
    )
    assert failure is None and seen
