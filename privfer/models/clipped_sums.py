"""Per-client sums of per-example clipped gradients, for many clients in one batched pass.

Distributed DP-SGD needs, from each client, ``sum_i clip_C(grad l_i)`` over its
records (the noise is added later, in the integer domain). Materialising every
example's gradient (Opacus's grad samplers: B x 198k floats for the VFER) is
the slow part of DP-SGD; here nothing per-example larger than a T x T Gram
matrix is formed:

* one forward pass records each parameterised layer's input ``a`` and, after
  one backward pass to the layer outputs, their gradients ``g`` (the
  "backprops"); for :class:`~privfer.models.dp_lstm.LSTMRecurrence` the gate
  gradients dG and previous hidden states it records itself. How a layer type
  gives its factors is registered beside its Opacus grad sampler
  (:func:`register_clipped_sum`; ``nn.Linear`` here,
  ``LSTMRecurrence`` in :mod:`privfer.models.dp_lstm`), so a new layer type is
  one registration, not a change here;
* an example's squared gradient norm is, per layer, the Gram identity
  ``||sum_t g_t a_t^T||^2 = sum_{t,s} (g_t . g_s)(a_t . a_s)`` (Li et al. 2022,
  "ghost clipping"; Opacus's norm samplers use the same identity) plus the
  bias term ``||sum_t g_t||^2``;
* with every example's factor ``min(1, C / ||grad l_i||)``, a client's clipped
  sum is one matrix product per layer over its own examples:
  ``sum_i f_i sum_t g_it a_it^T``.

Examples do not interact (no batch normalisation), so a batched pass over the
records of many clients gives each client exactly the sum it would compute
alone (tests check this, and the sums against Opacus's per-sample gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from privfer.models.loss import TrainingObjective

NORM_EPSILON = 1e-6  # as Opacus: factor C / (norm + 1e-6)


@dataclass(frozen=True)
class ClippedSumRule:
    """How one layer type's per-example weight gradient factors as ``sum_t g_t a_t^T`` (its bias's as
    ``sum_t g_t``), after one forward and one backward pass.

    ``hooked``: the recorder keeps the layer's input ``a`` and takes the gradient ``g`` of its output (a layer
    applied once per pass, like ``nn.Linear``); otherwise the layer records its own factors, which ``factors``
    returns. ``reset`` clears what the layer kept before a pass. ``factors(module, input, output_gradient)`` gives
    ``(g, a)`` as (B, T, G) and (B, T, A) tensors (``input`` and ``output_gradient`` are None for a self-recording
    layer)."""

    factors: Callable[[nn.Module, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
    hooked: bool = True
    reset: Callable[[nn.Module], None] = lambda module: None


RULES: dict[type[nn.Module], ClippedSumRule] = {}


def register_clipped_sum(layer_type: type[nn.Module], *, hooked: bool = True,
                         reset: Callable[[nn.Module], None] | None = None):
    """Register ``factors`` (the decorated function) as ``layer_type``'s :class:`ClippedSumRule`; as Opacus's
    ``register_grad_sampler``, beside which a layer's rule is written."""

    def register(factors):
        if layer_type in RULES:
            raise RuntimeError(f"a clipped-sum rule for {layer_type.__name__} is already registered")
        RULES[layer_type] = ClippedSumRule(factors, hooked, reset or (lambda module: None))
        return factors

    return register


def rule_for(module: nn.Module) -> ClippedSumRule:
    """The registered rule of ``module``'s type (or of its nearest registered base class); TypeError naming the
    supported types otherwise."""
    for kind in type(module).__mro__:
        if kind in RULES:
            return RULES[kind]
    raise TypeError(f"clipped sums support {', '.join(sorted(k.__name__ for k in RULES))} layers, not "
                    f"{type(module).__name__} (register one with privfer.models.clipped_sums.register_clipped_sum)")


@dataclass
class ClippedSums:
    """Per-group clipped gradient sums (float64, one tensor per parameter name) and how many examples were clipped."""

    sums: dict[str, torch.Tensor]  # name -> (groups, *parameter shape)
    clipped: int
    examples: int


class _Recorder:
    """Forward hooks that keep each hooked layer's input and output for one pass; the rule of every layer."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[str, tuple[nn.Module, ClippedSumRule]] = {}
        for name, module in model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self.layers[name] = (module, rule_for(module))
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, (module, rule) in self.layers.items() if rule.hooked]

    def reset(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        for module, rule in self.layers.values():
            rule.reset(module)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if name in self.inputs:
                raise RuntimeError(f"layer {name} is applied twice in one forward pass (weight sharing)")
            self.inputs[name] = inputs[0].detach()
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, F) -> (B, 1, F); (B, T, F) unchanged; other ranks flattened to (B, -1, F)."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _gram_norms(grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Per-example ||sum_t g_t a_t^T||_F^2 for (B, T, G) gradients and (B, T, A) activations."""
    if grads.shape[1] == 1:
        return (grads[:, 0] ** 2).sum(1) * (acts[:, 0] ** 2).sum(1)
    gram_g = torch.bmm(grads, grads.transpose(1, 2))
    gram_a = torch.bmm(acts, acts.transpose(1, 2))
    return (gram_g * gram_a).sum(dim=(1, 2)).clamp(min=0)


def clipped_gradient_sums(
    model: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    max_grad_norm: float,
    *,
    weights: torch.Tensor | None = None,
    objective: TrainingObjective | None = None,
    chunk: int = 2048,
) -> ClippedSums:
    """``sums[name][k] = sum over examples i of group k of clip(grad_name l_i)``, clipping each example's WHOLE
    gradient (every trainable parameter) to ``max_grad_norm``.

    ``groups`` (long, one per example, in 0..num_groups-1) says whose example
    each row is. The loss is ``objective`` per example (the label term by
    default; :class:`~privfer.models.loss.TrainingObjective`), times the
    example's ``weights`` entry when given. The model's parameter gradients are
    left untouched.
    """
    if not max_grad_norm > 0:
        raise ValueError("max_grad_norm must be positive")
    if len(features) != len(targets) or len(features) != len(groups):
        raise ValueError("features, targets and groups must have one row per example")
    if weights is not None and weights.shape != (len(features),):
        raise ValueError("weights must have one entry per example")
    if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(f"group indices must be in 0..{num_groups - 1}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros((num_groups, *p.shape), dtype=torch.float64) for name, p in params.items()}
    clipped = 0
    order = torch.argsort(groups, stable=True)
    features, targets, groups = features[order], targets[order], groups[order]
    weights = None if weights is None else weights[order]
    criterion = (objective or TrainingObjective()).with_reduction("sum")
    recorder = _Recorder(model)
    try:
        for start in range(0, len(features), chunk):
            x, y, g = features[start : start + chunk], targets[start : start + chunk], groups[start : start + chunk]
            w = None if weights is None else weights[start : start + chunk]
            clipped += _chunk(model, recorder, criterion, x, y, w, g, max_grad_norm, sums)
    finally:
        recorder.remove()
    return ClippedSums(sums, clipped, len(features))


def _chunk(model, recorder: _Recorder, criterion, x, y, w, g, max_grad_norm, sums) -> int:
    recorder.reset()
    loss = criterion(model(x), y, w)
    hooked = list(recorder.outputs)  # the hooked layers this pass applied (one not applied has no gradient)
    grads = dict(zip(hooked, torch.autograd.grad(loss, [recorder.outputs[n] for n in hooked], allow_unused=True)))
    layers: list[tuple[str, torch.Tensor, torch.Tensor, nn.Module]] = []  # (module name, grads, acts, module)
    for name, (module, rule) in recorder.layers.items():
        if rule.hooked:
            if name not in grads:
                continue
            if grads[name] is None:
                raise RuntimeError(f"layer {name} does not reach the loss")
            grad, act = rule.factors(module, recorder.inputs[name], grads[name].detach())
        else:
            try:
                grad, act = rule.factors(module, None, None)
            except RuntimeError as exc:
                raise RuntimeError(f"layer {name}: {exc}") from None
        layers.append((name, grad.detach(), act.detach(), module))
    squared = torch.zeros(len(x), dtype=torch.float64)
    for _, grad, act, module in layers:
        if module.weight.requires_grad:
            squared += _gram_norms(grad, act).double()
        if module.bias is not None and module.bias.requires_grad:
            squared += (grad.sum(1) ** 2).sum(1).double()
    norms = squared.sqrt()
    factors = (max_grad_norm / (norms + NORM_EPSILON)).clamp(max=1.0)
    # Contiguous runs of each group (the rows were sorted by group).
    present, counts = torch.unique_consecutive(g, return_counts=True)
    bounds = torch.cumsum(counts, 0).tolist()
    starts = [0] + bounds[:-1]
    weights = factors.to(layers[0][1].dtype) if layers else factors
    for prefix, grad, act, module in layers:
        w_name = f"{prefix}.weight" if prefix else "weight"
        b_name = f"{prefix}.bias" if prefix else "bias"
        has_bias = module.bias is not None and module.bias.requires_grad
        # sum_i f_i G_i^T A_i = G^T (f * A): scale whichever side is smaller
        scale_act = act.shape[-1] <= grad.shape[-1]
        if module.weight.requires_grad:
            scaled = act * weights.view(-1, 1, 1) if scale_act else grad * weights.view(-1, 1, 1)
        bias_terms = grad.sum(1) * weights.view(-1, 1) if has_bias else None
        for k, s, e in zip(present.tolist(), starts, bounds):
            if module.weight.requires_grad:
                left = grad[s:e] if scale_act else scaled[s:e]
                right = scaled[s:e] if scale_act else act[s:e]
                sums[w_name][k] += (left.reshape(-1, left.shape[-1]).t() @ right.reshape(-1, right.shape[-1])).double()
            if bias_terms is not None:
                sums[b_name][k] += bias_terms[s:e].sum(0).double()
    return int((norms > max_grad_norm).sum())


@register_clipped_sum(nn.Linear)
def _linear_factors(module: nn.Module, inputs: torch.Tensor | None, grad: torch.Tensor | None):
    """A linear layer applied to (B, F) or (B, T, F): its input and its output's gradient, per time step."""
    assert inputs is not None and grad is not None
    return _as_sequence(grad), _as_sequence(inputs)


__all__ = ["RULES", "ClippedSumRule", "ClippedSums", "clipped_gradient_sums", "register_clipped_sum", "rule_for"]
