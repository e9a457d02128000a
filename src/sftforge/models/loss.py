"""Token-normalised cross-entropy, computing the output head only where a label is trained.

The loss of an optimizer step is the sum of token losses over every trained token in that
step divided by the number of those tokens, however the step is split into micro-batches
and however many processes share it. So each micro-batch returns a *sum*, and the update
(training/update.py) divides by the step's total count, summed over every rank: averaging
per micro-batch or per rank would weight a short example's tokens more.

The head (hidden -> vocabulary) is the largest matmul of a small model and its logits the
largest tensor: [tokens x vocab], 49k wide for SmolLM2 and 150k-262k for current families.
So it runs only on the hidden states whose next token is trained, and in chunks of rows:
each chunk's logits are made, reduced to a loss and dropped, and remade one chunk at a time
in the backward pass. A full [trained tokens x vocab] tensor never exists.

Two options change what training (never evaluation) computes:
- **NEFTune** adds uniform noise to the input embeddings, of size alpha / sqrt(L x hidden)
  with L the length of the token's own example (not of its padded or packed row).
- **DFT** (dynamic fine-tuning) weights each token's cross-entropy by the model's probability
  of that token, held constant: -p.detach() x log p. Confident tokens weigh more; tokens the
  model finds unlikely are learned more slowly.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils.generic import is_flash_attention_requested

from sftforge.encode.batches import Batch, packed_segments, trained_positions_of
from sftforge.models.loading import causal_lm
from sftforge.models.per_example import NEFTUNE_STREAM, uniform_like

TokenLossKind = Literal["cross_entropy", "dft"]  # dft: weighted by the token's probability


# Configs whose head is more than a linear layer: use the model's own forward for them.
_HEAD_EXTRAS = ("final_logit_softcapping", "logits_scaling", "logit_scale")

# Logits alive at once: 512 rows x 49k words is 100 MB in fp32.
CHUNK_LOGIT_ELEMENTS = 512 * 49152


def _head_is_plain_linear(lm) -> bool:
    return all(getattr(lm.config, name, None) in (None, 1.0) for name in _HEAD_EXTRAS)


def summed_token_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    example_length_per_token: torch.Tensor | None = None,
    neftune_alpha: float | None = None,
    probability_weighted: bool = False,
    attention_mask: torch.Tensor | None = None,
    trained_positions: torch.Tensor | None = None,
    segments: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions (not averaged).

    `position_ids` restarting inside a row mark packed examples; the model then keeps each
    example's attention to itself. `attention_mask` ([rows, 1, length, length], True where
    a token may attend) replaces the model's own mask: rows sharing a prefix. With
    `neftune_alpha`, noise scaled by `example_length_per_token` ([rows, length]) is added to
    the input embeddings; `probability_weighted` is DFT. `trained_positions` and `segments`
    (a Batch's `trained_positions`, and `cu_seq_lens` with `longest_segment`) are found from
    the labels and positions when not given, which waits for the device."""
    lm = causal_lm(model)
    if trained_positions is None:
        trained_positions = trained_positions_of(labels)
    targets = labels.reshape(-1).index_select(0, trained_positions + 1)
    embedding = lm.get_input_embeddings()
    embeds = _embeddings_with_trained_rows(embedding, input_ids)
    if neftune_alpha is not None:
        embeds = embedding(input_ids) if embeds is None else embeds
        embeds = embeds + neftune_noise(embeds, example_length_per_token, neftune_alpha)
    inputs = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
    if not _head_is_plain_linear(lm):
        logits = model(
            **_attention_inputs(lm, inputs, position_ids, attention_mask, segments),
            use_cache=False,
        ).logits
        token_losses = F.cross_entropy(
            _rows_at(logits, trained_positions).float(), targets, reduction="none"
        )
        return _summed(token_losses, probability_weighted)
    hidden = last_hidden_states(lm, inputs, position_ids, attention_mask, segments)
    return chunked_head_loss(
        lm.get_output_embeddings(),
        _rows_at(hidden, trained_positions),
        targets,
        probability_weighted=probability_weighted,
    )


def last_hidden_states(lm, inputs: dict, position_ids=None, attention_mask=None, segments=None):
    """The decoder's output for `inputs` (input_ids or inputs_embeds), [rows, length, hidden]
    or, for packed rows under flash-attention, [1, rows x length, hidden]."""
    decoder = lm.get_decoder()
    return decoder(
        **_attention_inputs(lm, inputs, position_ids, attention_mask, segments), use_cache=False
    )[0]


def _attention_inputs(lm, inputs: dict, position_ids, attention_mask, segments) -> dict:
    """What the model's attention needs besides the tokens. Flash-attention separates packed
    examples only in a batch of one row (and otherwise attends across them): packed rows are
    handed to it as one row with their segments' lengths."""
    if attention_mask is not None:
        return inputs | {
            "position_ids": position_ids,
            "attention_mask": as_model_mask(lm, attention_mask),
        }
    if position_ids is None or not is_flash_attention_requested(lm.config):
        return inputs | {"position_ids": position_ids}
    cu_seq_lens, longest = segments if segments is not None else packed_segments(position_ids)
    flat = {name: value.reshape(1, -1, *value.shape[2:]) for name, value in inputs.items()}
    return flat | {
        "position_ids": position_ids.reshape(1, -1),
        "cu_seq_lens_q": cu_seq_lens.to(position_ids.device),
        "cu_seq_lens_k": cu_seq_lens.to(position_ids.device),
        "max_length_q": longest,
        "max_length_k": longest,
    }


def _rows_at(states: torch.Tensor, flat_positions: torch.Tensor) -> torch.Tensor:
    """[positions, features] of [rows, length, features] states at flat row x length indices."""
    return states.reshape(-1, states.shape[-1]).index_select(0, flat_positions)


def as_model_mask(lm, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask as the model's attention takes it: SDPA takes it as it is, eager
    attention adds it to the scores (0 where allowed, the dtype's lowest elsewhere)."""
    if getattr(lm.config, "_attn_implementation", "sdpa") != "eager":
        return allowed
    dtype = lm.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def neftune_noise(embeds: torch.Tensor, example_length_per_token: torch.Tensor, alpha: float):
    """Uniform noise in [-1, 1] x alpha / sqrt(L x hidden), L each token's example's length."""
    if example_length_per_token is None:
        raise ValueError(
            "NEFTune needs each token's example length (Batch.example_length_per_token)"
        )
    scale = (
        alpha / (example_length_per_token.clamp(min=1) * embeds.shape[-1]).to(torch.float32).sqrt()
    )
    uniform = uniform_like(embeds, NEFTUNE_STREAM)  # each example's own, in training
    if uniform is None:
        uniform = torch.rand_like(embeds, dtype=torch.float32)
    noise = uniform.mul_(2).sub_(1)
    return (noise * scale[..., None]).to(embeds.dtype)


def _summed(token_losses: torch.Tensor, probability_weighted: bool) -> torch.Tensor:
    """The sum of per-token cross-entropies; under DFT each weighted by exp(-loss), the
    model's probability of the token, held constant."""
    if probability_weighted:
        token_losses = token_losses * torch.exp(-token_losses.detach())
    return token_losses.sum()


class TokenLoss(torch.nn.Module):
    """The model as training calls it: (input ids, labels, positions, each token's example
    length) -> summed token loss. NEFTune and DFT apply in training mode only: evaluation
    always measures plain cross-entropy on clean inputs.

    DDP and FSDP act on a module's forward (DDP readies its gradient reduction there, FSDP
    gathers the weights of the outermost unit: embeddings, final norm, head). The loss runs
    the decoder and the head itself, so it is this module that they wrap."""

    def __init__(
        self,
        model: torch.nn.Module,
        neftune_alpha: float | None = None,
        probability_weighted: bool = False,
    ):
        super().__init__()
        self.model = model
        self.neftune_alpha = neftune_alpha
        self.probability_weighted = probability_weighted

    def forward(
        self,
        input_ids,
        labels,
        position_ids=None,
        example_length_per_token=None,
        attention_mask=None,
        trained_positions=None,
        segments=None,
    ) -> torch.Tensor:
        return summed_token_loss(
            self.model,
            input_ids,
            labels,
            position_ids,
            example_length_per_token,
            neftune_alpha=self.neftune_alpha if self.training else None,
            probability_weighted=self.probability_weighted and self.training,
            attention_mask=attention_mask,
            trained_positions=trained_positions,
            segments=segments,
        )

    def apply_to_model(self, fn):
        """`fn(model)`: measuring or generating with the model. Under FSDP this method is
        registered as a forward (distributed.wrap_for_training), so that the weights of the
        outermost unit (embeddings, final norm, head) are gathered around it; every rank
        then calls it alike."""
        return fn(self.model)


def batch_loss(loss_module, batch: Batch) -> torch.Tensor:
    """The summed token loss of `batch` (on the model's device) through `loss_module`: a
    TokenLoss, maybe under DDP or FSDP, which act on its forward."""
    segments = None if batch.cu_seq_lens is None else (batch.cu_seq_lens, batch.longest_segment)
    return loss_module(
        batch.input_ids,
        batch.labels,
        batch.position_ids,
        batch.example_length_per_token,
        batch.attention_mask,
        batch.trained_positions,
        segments,
    )


def _trained_rows(module):
    """(the wrapped layer, row ids, rows) where peft's trainable-token rows (for tokens a
    template added) replace rows of `module`'s weight; (the layer, None, None) where they are
    off; None for any other module, or several active adapters."""
    layer = getattr(module, "token_adapter", None)  # peft's TrainableTokensWrapper
    base = getattr(layer, "base_layer", None)
    if base is None or len(layer.active_adapters) > 1:
        return None
    if layer.merged or layer.disable_adapters or not layer.active_adapters:
        return base, None, None
    name = layer.active_adapters[0]
    row_ids = torch.tensor(layer.token_indices[name], device=base.weight.device)
    return base, row_ids, layer.trainable_tokens_delta[name]


def _embeddings_with_trained_rows(embedding, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The input embeddings, with the trained rows of added tokens in place, made without
    copying the whole matrix (peft's own forward copies it, and its gradient is dense); None
    where the embedding has no trained rows."""
    found = _trained_rows(embedding)
    if found is None or found[1] is None or not isinstance(found[0], torch.nn.Embedding):
        return None
    base, row_ids, rows = found
    embeds = base(input_ids)  # frozen: no gradient for the matrix
    position = torch.full((base.num_embeddings,), -1, device=input_ids.device)
    position[row_ids] = torch.arange(len(row_ids), device=input_ids.device)
    which = position[input_ids]
    scale = getattr(base, "embed_scale", None)  # e.g. Gemma scales its embeddings
    replaced = rows[which.clamp(min=0)] * (1.0 if scale is None else scale)
    return torch.where((which >= 0)[..., None], replaced.to(embeds.dtype), embeds)


def chunked_head_loss(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    probability_weighted: bool = False,
) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) against targets, `chunk_rows` rows at a time, so
    at most one chunk of logits is alive.

    A plain linear head (the usual case, also under peft's trainable rows for tokens a
    template added) takes the fused path: each chunk's gradient is computed with its loss, in
    the forward pass, and kept (it is as small as `hidden`), so nothing is recomputed, and the
    trained rows get their gradient alone, never the whole matrix's. Any other head is
    checkpointed per chunk: its logits are recomputed in the backward. `probability_weighted`:
    each token's loss weighted by its probability (DFT)."""
    vocab = getattr(head, "out_features", None) or 262_144  # a wrapped head: assume wide
    chunk_rows = chunk_rows or max(1, CHUNK_LOGIT_ELEMENTS // vocab)
    chunks = [slice(s, s + chunk_rows) for s in range(0, hidden.shape[0], chunk_rows)]
    zero = hidden.new_zeros((), dtype=torch.float32)
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    linear = _as_linear_head(head)
    if linear is not None:
        weight, row_ids, rows = linear
        if wants_grad:
            return _LinearCrossEntropy.apply(
                hidden, weight, rows, targets, chunk_rows, row_ids, probability_weighted
            )
        head = functools.partial(_head_logits, weight=weight, rows=rows, row_ids=row_ids)
    loss = functools.partial(_head_loss, head, probability_weighted=probability_weighted)
    if not wants_grad:  # evaluation: the loss alone
        return sum((loss(hidden[c], targets[c]) for c in chunks), start=zero)
    if len(chunks) == 1:
        return loss(hidden, targets)
    return sum(
        (checkpoint(loss, hidden[c], targets[c], use_reentrant=False) for c in chunks),
        start=zero,
    )


def _as_linear_head(head):
    """(weight, row ids, rows) of a head that is a linear map without bias, or None: an
    nn.Linear (no rows), or peft's trainable-token rows over one (for tokens a template
    added: the rows `row ids` of `weight` are replaced by `rows`, which are trained)."""
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight, None, None
    found = _trained_rows(head)
    if found is None or type(found[0]) is not torch.nn.Linear or found[0].bias is not None:
        return None
    base, row_ids, rows = found
    return base.weight, row_ids, rows


def _head_logits(hidden, weight, rows=None, row_ids=None) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    if rows is not None:
        logits = logits.index_copy(-1, row_ids, F.linear(hidden, rows.to(weight.dtype)))
    return logits


def _head_loss(head, hidden, targets, probability_weighted: bool = False) -> torch.Tensor:
    token_losses = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    return _summed(token_losses, probability_weighted)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ W.T, targets)) with its gradients made chunk by chunk, where
    W is `weight` with the rows `row_ids` replaced by `rows` (when given).

    The gradient of the summed loss with respect to a chunk's logits is softmax - one_hot;
    from it come the chunk's hidden gradient (@ W) and its share of the gradients of the
    weight and of the replacing rows (.T @ hidden, the rows' columns alone for them). Matmuls
    run in the autocast dtype when autocast is on, softmax in fp32. Under DFT
    (`probability_weighted`) a token's loss and its logits' gradient are scaled by its
    probability, a constant."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk_rows, row_ids, probability_weighted):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype or weight.dtype)
            r = None if rows is None else rows.to(w.dtype)
            h_all = hidden.to(w.dtype)
            grad_hidden = torch.empty_like(h_all)
            grad_weight = (
                torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            )
            grad_rows = (
                torch.zeros_like(r, dtype=torch.float32) if ctx.needs_input_grad[2] else None
            )
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_rows):
                h, t = h_all[start : start + chunk_rows], targets[start : start + chunk_rows]
                logits = (h @ w.T).float()
                if r is not None:
                    logits[:, row_ids] = (h @ r.T).float()
                logsumexp = logits.logsumexp(dim=-1, keepdim=True)
                token_losses = logsumexp.squeeze(1) - logits.gather(1, t[:, None]).squeeze(1)
                total += _summed(token_losses, probability_weighted)
                grad_logits = logits.sub_(logsumexp).exp_()  # softmax, in place
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
                if probability_weighted:
                    grad_logits *= torch.exp(-token_losses)[:, None]
                grad_logits = grad_logits.to(w.dtype)
                grad_chunk = grad_logits @ w
                if r is not None:
                    grad_chunk += grad_logits[:, row_ids] @ (r - w[row_ids])
                    if grad_rows is not None:
                        grad_rows += (grad_logits[:, row_ids].T @ h).float()
                grad_hidden[start : start + chunk_rows] = grad_chunk
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).float()
            if grad_weight is not None and r is not None:
                grad_weight[row_ids] = 0.0  # those rows of the weight are not used
        ctx.save_for_backward(grad_hidden, grad_weight, grad_rows)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if rows is None else rows.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_rows = ctx.saved_tensors
        hidden_dtype, weight_dtype, rows_dtype = ctx.dtypes
        grad_h = (grad_hidden * grad_total).to(hidden_dtype)
        grad_w = None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype)
        grad_r = None if grad_rows is None else (grad_rows * grad_total).to(rows_dtype)
        return grad_h, grad_w, grad_r, None, None, None, None
