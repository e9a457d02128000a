"""Each step's bf16 weights are rounded stochastically from the fp32 master weights: every
value becomes one of its two bf16 neighbours, on average the master itself; the trained
matrices hold those values during the step only, and the master comes back bit for bit."""

import pytest
import torch

from sftforge.training.stochastic_rounding import (
    StochasticBf16Weights,
    stochastic_bf16,
    weight_rounding,
)


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 numbers just below and just above |x| in magnitude (x's sign kept)."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    return down, up


def test_each_value_goes_to_one_of_its_two_bf16_neighbours_and_bf16_values_stay():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10_000) * 0.02, -torch.rand(10_000) * 3, torch.tensor([2**-126])])
    rounded = stochastic_bf16(x.clone())
    down, up = bf16_neighbours(x)
    assert torch.equal(rounded, rounded.bfloat16().float())  # bf16 numbers, held in fp32
    assert bool(((rounded == down) | (rounded == up)).all())
    exact = x.bfloat16().float()
    assert torch.equal(stochastic_bf16(exact.clone()), exact)


@pytest.mark.parametrize("value", [0.0213, -0.0213, 1.0 - 2**-20, -(1.0 - 2**-20), 3e-38, 7.1])
def test_on_average_the_rounded_value_is_the_value_itself(value):
    """Up with probability (distance from the lower neighbour) / (gap), so the mean over many
    draws is the value, within its standard error. 1 - 2^-20 rounds up across a power of
    two (to 1.0, whose gap above is twice the one below)."""
    draws = 200_000
    x = torch.full((draws,), value, dtype=torch.float32)
    down, up = bf16_neighbours(x[:1])
    gap = float((up - down).abs())
    p_up = abs(value - float(down)) / gap
    mean = float(stochastic_bf16(x.clone(), torch.Generator().manual_seed(1)).double().mean())
    standard_error = gap * (p_up * (1 - p_up) / draws) ** 0.5
    assert abs(mean - value) <= 5 * standard_error + 1e-12 * abs(value)


def model_with_tied_and_1d_weights():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = embedding.weight  # tied: one parameter, rounded once
    norm = torch.nn.LayerNorm(16)
    model = torch.nn.ModuleDict({"embedding": embedding, "proj": torch.nn.Linear(16, 16)})
    model["norm"], model["head"] = norm, head
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # low bits everywhere
    return model


def test_within_a_step_the_matrices_hold_bf16_values_and_after_it_their_masters_bitwise():
    model = model_with_tied_and_1d_weights()
    params = list(model.parameters())
    masters = {name: p.detach().clone() for name, p in model.named_parameters()}
    rounding = StochasticBf16Weights(params)
    assert len(rounding.matrices) == 2  # the tied embedding/head and proj's weight
    with rounding.rounded(seed=7):
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                assert torch.equal(p, p.bfloat16().float()), name
                assert not torch.equal(p, masters[name]), name
                assert (p - masters[name]).abs().max() < masters[name].abs().max() * 2**-7
            else:  # norms and biases are not cast for a matmul: left as they are
                assert torch.equal(p, masters[name]), name
        first = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(p.view(torch.int32), masters[name].view(torch.int32)), name
    with rounding.rounded(seed=7):  # the same seed rounds alike (a resumed step, a DDP rank)
        assert all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    with rounding.rounded(seed=8):
        assert not torch.equal(model["proj"].weight, first["proj.weight"])


def test_a_matrix_larger_than_the_random_pool_is_rounded_chunk_by_chunk():
    """The random numbers come from a pool read at each step's offsets, one pool's length of
    the matrix at a time: every element of every chunk is rounded, and comes back."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(37, 100) * 0.02)  # 3,700 elements, pool of 1,000
    master = weight.detach().clone()
    down, up = bf16_neighbours(master)
    rounding = StochasticBf16Weights([weight], pool_size=1000)
    with rounding.rounded(seed=5):
        assert bool(((weight == down) | (weight == up)).all())
        ups = (weight == up) & (up != down)
        for chunk in ups.view(-1).split(1000):  # each chunk drew its own numbers
            assert 0.2 < float(chunk.float().mean()) < 0.8
    assert torch.equal(weight.view(torch.int32), master.view(torch.int32))


def test_from_step_to_step_each_element_is_its_master_on_average():
    """Over steps, an element's random number is a fresh draw from the pool: the mean of its
    rounded values is the master, for every element (here 0.0213 and -0.0213 in a matrix
    three pools long)."""
    weight = torch.nn.Parameter(torch.tensor([0.0213, -0.0213]).repeat(3 * 256).view(6, 256))
    down, up = bf16_neighbours(weight.detach()[:1, :2].clone())
    gap = float((up - down).abs()[0, 0])
    rounding = StochasticBf16Weights([weight], pool_size=512)
    steps = 4000
    total = torch.zeros_like(weight, dtype=torch.float64)
    for seed in range(steps):
        with rounding.rounded(seed):
            total += weight.detach().double()
    mean = total / steps
    p_up = (0.0213 - float(down.abs()[0, 0])) / gap
    standard_error = gap * (p_up * (1 - p_up) / steps) ** 0.5
    assert float((mean.abs() - 0.0213).abs().max()) < 5 * standard_error


def test_the_masters_come_back_when_the_step_fails():
    model = model_with_tied_and_1d_weights()
    masters = [p.detach().clone() for p in model.parameters()]
    with (
        pytest.raises(RuntimeError, match="boom"),
        StochasticBf16Weights(list(model.parameters())).rounded(seed=1),
    ):
        raise RuntimeError("boom")
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), masters, strict=True))


def test_gradients_reach_the_masters_and_autocast_computes_with_the_rounded_weights():
    """Autocast's own cast of a rounded weight is exact: the matmul uses the stochastically
    rounded value; the gradient lands in the fp32 parameter, as without rounding."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(4, 32)
    with StochasticBf16Weights([layer.weight]).rounded(seed=3):
        rounded = layer.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
    expected = (x.bfloat16().float() @ rounded.T).bfloat16()
    assert torch.equal(out, expected)
    assert layer.weight.grad.dtype == torch.float32
    expected_grad = x.bfloat16().float().sum(0).expand(8, 32)  # d(sum of outputs) / dW
    assert torch.allclose(layer.weight.grad, expected_grad, rtol=1e-2, atol=1e-2)


def test_only_bf16_autocast_with_the_stochastic_setting_rounds():
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    assert isinstance(weight_rounding(params, torch.bfloat16, "stochastic"), StochasticBf16Weights)
    assert weight_rounding(params, torch.bfloat16, "nearest") is None
    assert weight_rounding(params, None, "stochastic") is None  # fp32: nothing to round
    assert weight_rounding(params, torch.float16, "stochastic") is None
