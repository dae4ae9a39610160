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

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn


class _Recurrence(torch.autograd.Function):
    """h_t, c_t from precomputed input gates; backward records dG for the grad sampler.

    Everything that does not depend on the time recursion (the gates'
    derivatives) is computed for all steps at once, outside the loops, so each
    step is a handful of tensor operations.
    """

    @staticmethod
    def forward(ctx, gates_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cell: "LSTMRecurrence"):
        batch, steps, four_h = gates_x.shape
        hidden = four_h // 4
        pre = gates_x + bias
        h = gates_x.new_zeros(batch, hidden)
        c = gates_x.new_zeros(batch, hidden)
        h_all = gates_x.new_empty(batch, steps + 1, hidden)  # h_0 .. h_T; h_prev is h_all[:, :-1]
        h_all[:, 0] = 0
        cells = gates_x.new_empty(batch, steps + 1, hidden)  # c_0 .. c_T
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
        ctx.cell = cell
        cell._h_prev = h_all[:, :-1]
        return h_all[:, 1:]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, h_all, cells, acts = ctx.saved_tensors
        batch, steps, four_h = acts.shape
        hidden = four_h // 4
        i, f = acts[..., :hidden], acts[..., hidden : 2 * hidden]
        g, o = acts[..., 2 * hidden : 3 * hidden], acts[..., 3 * hidden :]
        tanh_c = torch.tanh(cells[:, 1:])
        # Per-step factors of the chain rule, for all steps at once.
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
        ctx.cell._d_gates = d_gates
        ctx.cell._grad_out = grad_out
        flat = d_gates.reshape(-1, four_h)
        grad_weight = flat.t() @ h_all[:, :-1].reshape(-1, hidden) if ctx.needs_input_grad[1] else None
        grad_bias = flat.sum(0) if ctx.needs_input_grad[2] else None
        return d_gates, grad_weight, grad_bias, None


class LSTMRecurrence(nn.Module):
    """The recurrent half of an LSTM layer: weight_hh (4H x H) and bias (4H) over precomputed input gates."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self._h_prev: torch.Tensor | None = None
        self._d_gates: torch.Tensor | None = None
        self._grad_out: torch.Tensor | None = None

    def forward(self, gates_x: torch.Tensor) -> torch.Tensor:
        """(B, T, 4H) input gates -> (B, T, H) hidden states."""
        return _Recurrence.apply(gates_x, self.weight, self.bias, self)

    def _recorded(self, backprops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dG and H from the last backward pass, scaled as Opacus scaled this layer's backprops.

        Opacus multiplies backprops by the batch size when the loss is a mean
        (``loss_reduction="mean"``); the recorded dG must get the same factor,
        which is read off the backprops it hands to the sampler.
        """
        if self._d_gates is None or self._h_prev is None or self._grad_out is None:
            raise RuntimeError("per-sample gradients need a forward and backward pass of this layer first")
        d_gates, h_prev, grad_out = self._d_gates, self._h_prev, self._grad_out
        self._d_gates = self._grad_out = None  # one use per backward pass
        energy = (grad_out * grad_out).sum()
        if energy > 0:
            d_gates = d_gates * ((backprops * grad_out).sum() / energy)
        return d_gates, h_prev


@register_grad_sampler(LSTMRecurrence)
def compute_recurrence_grad_sample(
    layer: LSTMRecurrence, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the recurrent weights: one einsum over all time steps."""
    d_gates, h_prev = layer._recorded(backprops)
    result = {}
    if layer.weight.requires_grad:
        result[layer.weight] = torch.einsum("btg,bth->bgh", d_gates, h_prev)
    if layer.bias.requires_grad:
        result[layer.bias] = d_gates.sum(dim=1)
    return result


@register_norm_sampler(LSTMRecurrence)
def compute_recurrence_norm_sample(
    layer: LSTMRecurrence, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms without forming the gradients (the T x T Gram trick)."""
    d_gates, h_prev = layer._recorded(backprops)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        last_h = []
        for layer in self.layers:
            x = layer(x)
            last_h.append(x[:, -1])
        h_n = torch.stack(last_h) if last_h else x.new_zeros(0)
        return x, (h_n, torch.zeros_like(h_n))

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
