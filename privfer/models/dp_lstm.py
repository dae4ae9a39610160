"""A DP-friendly LSTM: per-sample gradients by batched tensor algebra over all time steps.

Opacus's ``DPLSTM`` runs the recurrence as Python-level cells whose per-step
linear layers are hooked one by one, costing 10-12x a plain ``nn.LSTM`` step.
:class:`FastDPLSTM` instead splits each layer into two parameterized parts
that Opacus sees once per batch:

* ``ih`` — an ``nn.Linear(D, 4H)`` applied to the whole sequence at once
  (one matrix product for every frame). Opacus's own ``nn.Linear`` grad and
  norm samplers handle it: their backprops are the gradients of the gate
  pre-activations, exactly what the per-sample weight gradient needs.
* ``hh`` — :class:`LSTMRecurrence`, the recurrent weights, run by a custom
  autograd function whose backward pass (backpropagation through time)
  records the gate pre-activation gradients dG (B, T, 4H) and the previous
  hidden states H (B, T, H). Its registered grad sampler forms every example's
  gradient with one einsum over time, ``einsum("btg,bth->bgh", dG, H)``; its
  norm sampler (for Opacus's ghost clipping) uses the T x T Gram trick,
  ``||sum_t g_t h_t^T||^2 = sum_{t,s} (g_t . g_s)(h_t . h_s)``.

The DP-SGD engine stays Opacus: ``PrivacyEngine.make_private`` accepts the
model as it is, with its optimizer, accountants and Poisson data loader.
Gate order and initialisation follow ``nn.LSTM`` (i, f, g, o; uniform in
+-1/sqrt(H)), and :meth:`FastDPLSTM.load_lstm_state` copies an ``nn.LSTM``'s
weights, so the two compute the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn

from privfer.models.clipped_sums import register_clipped_sum


@dataclass
class _Pass:
    """What one forward call of a recurrence leaves for its per-sample gradients."""

    weight: torch.Tensor
    h_all: torch.Tensor  # h_0 .. h_T
    cells: torch.Tensor  # c_0 .. c_T
    acts: torch.Tensor  # activated gates i, f, g, o
    d_gates: torch.Tensor | None = None  # set by the backward pass
    grad_out: torch.Tensor | None = None

    @property
    def h_prev(self) -> torch.Tensor:
        return self.h_all[:, :-1]


def _backprop_through_time(record: _Pass, grad_out: torch.Tensor) -> torch.Tensor:
    """dL/d(gate pre-activations), (B, T, 4H), for the output gradients ``grad_out`` (B, T, H).

    Everything that does not depend on the time recursion (the gates'
    derivatives) is computed for all steps at once, outside the loop, so each
    step is a handful of tensor operations.
    """
    acts, cells, weight = record.acts, record.cells, record.weight
    batch, steps, four_h = acts.shape
    hidden = four_h // 4
    i, f = acts[..., :hidden], acts[..., hidden : 2 * hidden]
    g, o = acts[..., 2 * hidden : 3 * hidden], acts[..., 3 * hidden :]
    tanh_c = torch.tanh(cells[:, 1:])
    to_cell = o * (1 - tanh_c * tanh_c)  # dc += dh * to_cell
    gate_factors = torch.stack(
        [g * i * (1 - i), cells[:, :-1] * f * (1 - f), i * (1 - g * g)], dim=2
    )  # (B, T, 3, H): dz_i, dz_f, dz_g = dc * factor
    out_factor = tanh_c * o * (1 - o)  # dz_o = dh * factor
    d_gates = grad_out.new_empty(batch, steps, four_h)
    dh = grad_out.new_zeros(batch, hidden)
    dc = grad_out.new_zeros(batch, hidden)
    for t in reversed(range(steps)):
        dh = dh + grad_out[:, t]
        dc = torch.addcmul(dc, dh, to_cell[:, t])
        dz = d_gates[:, t]
        torch.mul(gate_factors[:, t], dc.unsqueeze(1), out=dz[:, : 3 * hidden].view(batch, 3, hidden))
        torch.mul(out_factor[:, t], dh, out=dz[:, 3 * hidden :])
        dh = dz @ weight
        dc = dc * f[:, t]
    return d_gates


_PROPORTIONAL_TOLERANCE = 1e-6


def _per_sample_scale(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
    """Per-example factors s with ``second[b] == s[b] * first[b]``, or None if the gradients are not so related.

    Opacus's ghost clipping backpropagates twice through the same graph: the
    loss, then the loss with every example's term multiplied by its clipping
    factor. The gate gradients dG are linear in the output gradients and each
    example's depend on its own only, so when the second output gradients are
    per-example multiples of the first (checked, in float64, to a relative
    residual of 1e-6 — float32 rounding is about 1e-7), dG is the first pass's
    dG times the same factors, and backpropagation through time need not run
    again. Anything else (another loss, another graph) returns None and is
    recomputed in full.
    """
    if first.shape != second.shape:
        return None
    a, b = first.double().flatten(1), second.double().flatten(1)
    energy = (a * a).sum(1)
    scale = torch.where(energy > 0, (a * b).sum(1) / energy.clamp(min=1e-300), torch.zeros_like(energy))
    residual = ((b - scale.unsqueeze(1) * a) ** 2).sum(1)
    if bool((residual > _PROPORTIONAL_TOLERANCE**2 * (b * b).sum(1)).any()):
        return None
    return scale.to(first.dtype)


class _Recurrence(torch.autograd.Function):
    """h_t, c_t from precomputed input gates; the backward pass keeps dG for the grad sampler."""

    @staticmethod
    def forward(ctx, gates_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, passes: list):
        batch, steps, four_h = gates_x.shape
        hidden = four_h // 4
        pre = gates_x + bias
        h = gates_x.new_zeros(batch, hidden)
        c = gates_x.new_zeros(batch, hidden)
        h_all = gates_x.new_empty(batch, steps + 1, hidden)
        h_all[:, 0] = 0
        cells = gates_x.new_empty(batch, steps + 1, hidden)
        cells[:, 0] = 0
        acts = gates_x.new_empty(batch, steps, four_h)
        weight_t = weight.t()
        for t in range(steps):
            a = acts[:, t]
            torch.addmm(pre[:, t], h, weight_t, out=a)
            g = a[:, 2 * hidden : 3 * hidden].tanh_()  # candidate
            a[:, : 2 * hidden].sigmoid_()  # input, forget
            a[:, 3 * hidden :].sigmoid_()  # output
            c = torch.addcmul(a[:, hidden : 2 * hidden] * c, a[:, :hidden], g, out=cells[:, t + 1])
            h = torch.mul(a[:, 3 * hidden :], torch.tanh(c), out=h_all[:, t + 1])
        ctx.save_for_backward(weight, h_all, cells, acts)
        ctx.record = _Pass(weight, h_all, cells, acts)
        passes.append(ctx.record)
        c_n = cells[:, -1].clone()
        ctx.mark_non_differentiable(c_n)
        return h_all[:, 1:], c_n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_c_n: torch.Tensor | None = None):
        record: _Pass = ctx.record
        scale = None
        if record.d_gates is not None and record.grad_out is not None:
            scale = _per_sample_scale(record.grad_out, grad_out)
        if scale is not None:  # a repeated backward with per-sample rescaled gradients (ghost clipping)
            d_gates = record.d_gates * scale.view(-1, 1, 1)
        else:
            d_gates = _backprop_through_time(record, grad_out)
            record.d_gates, record.grad_out = d_gates, grad_out.clone()  # callers may reuse their buffer
        hidden = record.h_all.shape[-1]
        flat = d_gates.reshape(-1, 4 * hidden)
        grad_weight = flat.t() @ record.h_prev.reshape(-1, hidden) if ctx.needs_input_grad[1] else None
        grad_bias = flat.sum(0) if ctx.needs_input_grad[2] else None
        return d_gates, grad_weight, grad_bias, None


class LSTMRecurrence(nn.Module):
    """The recurrent half of an LSTM layer: weight_hh (4H x H) and bias (4H) over precomputed input gates."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self._passes: list[_Pass] = []  # forward calls (with autograd on) awaiting their per-sample gradients

    def forward(self, gates_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 4H) input gates -> (B, T, H) hidden states and the last cell state c_T (B, H)."""
        made: list[_Pass] = []
        hidden, c_n = _Recurrence.apply(gates_x, self.weight, self.bias, made)
        if torch.is_grad_enabled():  # (autograd is off inside Function.forward, so decide here)
            self._remember(made[0])
        return hidden, c_n

    def _remember(self, record: _Pass) -> None:
        # A pass whose backward already ran and was not consumed (plain training, or the
        # second, hook-free backward of ghost clipping) belongs to an earlier step.
        self._passes = [p for p in self._passes if p.d_gates is None]
        self._passes.append(record)

    def _per_sample_gates(self, backprops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dG and H of the forward call whose backward Opacus is hooking, scaled like Opacus's backprops.

        Opacus calls the hook once per forward call, in reverse order, so the
        latest recorded pass is the one. If its backward has not run yet (the
        hook fires first when the layer's input needs no gradient), dG is
        computed here from the backprops. Opacus multiplies backprops by the
        batch size for mean-reduced losses; a recorded dG gets the same factor,
        read off the backprops (in float64, so tiny gradients do not underflow).
        """
        if not self._passes:
            raise RuntimeError("per-sample gradients need a forward pass with autograd on")
        record = self._passes.pop()
        if record.d_gates is None or record.grad_out is None:
            return _backprop_through_time(record, backprops), record.h_prev
        d_gates, grad_out = record.d_gates, record.grad_out.double()
        energy = (grad_out * grad_out).sum()
        if energy > 0:
            d_gates = d_gates * ((backprops.double() * grad_out).sum() / energy).to(d_gates.dtype)
        return d_gates, record.h_prev


@register_grad_sampler(LSTMRecurrence)
def compute_recurrence_grad_sample(
    layer: LSTMRecurrence, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the recurrent weights: one einsum over all time steps."""
    d_gates, h_prev = layer._per_sample_gates(backprops)
    result = {}
    if layer.weight.requires_grad:
        result[layer.weight] = torch.einsum("btg,bth->bgh", d_gates, h_prev)
    if layer.bias.requires_grad:
        result[layer.bias] = d_gates.sum(dim=1)
    return result


@register_clipped_sum(LSTMRecurrence, hooked=False, reset=lambda layer: layer._passes.clear())
def recurrence_clipped_sum_factors(layer: LSTMRecurrence, inputs: None, grad: None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched clipped sums' factors (:mod:`privfer.models.clipped_sums`): the gate gradients dG (B, T, 4H) and
    the previous hidden states H (B, T, H) of the one pass the layer recorded, its backward run."""
    if len(layer._passes) != 1 or layer._passes[0].d_gates is None:
        raise RuntimeError("expected one forward and one backward pass")
    record = layer._passes.pop()
    return record.d_gates, record.h_prev


@register_norm_sampler(LSTMRecurrence)
def compute_recurrence_norm_sample(
    layer: LSTMRecurrence, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms without forming the gradients (the T x T Gram trick)."""
    d_gates, h_prev = layer._per_sample_gates(backprops)
    result = {}
    if layer.weight.requires_grad:
        gram_g = torch.einsum("btg,bsg->bts", d_gates, d_gates)
        gram_h = torch.einsum("bth,bsh->bts", h_prev, h_prev)
        result[layer.weight] = torch.sqrt((gram_g * gram_h).sum(dim=(1, 2)).clamp(min=0))
    if layer.bias.requires_grad:
        result[layer.bias] = d_gates.sum(dim=1).norm(dim=1)
    return result


class FastDPLSTMLayer(nn.Module):
    """One LSTM layer: the input projection for every frame in one product, then the recurrence."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = LSTMRecurrence(hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hh(self.ih(x))


class FastDPLSTM(nn.Module):
    """Batch-first LSTM (like ``nn.LSTM(..., batch_first=True)``) with fast Opacus per-sample gradients.

    Returns ``(output, (h_n, c_n))`` like ``nn.LSTM``; only zero initial states are supported.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = True) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("FastDPLSTM is batch-first only")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            FastDPLSTMLayer(input_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # as nn.LSTM
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if state is not None:
            raise ValueError("FastDPLSTM starts from zero states only")
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"expected (batch, frames, {self.input_size}) input, got {tuple(x.shape)}")
        last_h, last_c = [], []
        for layer in self.layers:
            x, c_n = layer(x)
            last_h.append(x[:, -1])
            last_c.append(c_n)
        return x, (torch.stack(last_h), torch.stack(last_c))

    @torch.no_grad()
    def load_lstm_state(self, lstm: nn.LSTM) -> "FastDPLSTM":
        """Copy the weights of an ``nn.LSTM`` (same sizes, bias=True) so both compute the same function."""
        if (lstm.input_size, lstm.hidden_size, lstm.num_layers) != (self.input_size, self.hidden_size, self.num_layers):
            raise ValueError("the nn.LSTM has other sizes")
        for index, layer in enumerate(self.layers):
            layer.ih.weight.copy_(getattr(lstm, f"weight_ih_l{index}"))
            layer.ih.bias.copy_(getattr(lstm, f"bias_ih_l{index}"))
            layer.hh.weight.copy_(getattr(lstm, f"weight_hh_l{index}"))
            layer.hh.bias.copy_(getattr(lstm, f"bias_hh_l{index}"))
        return self
