"""The fast DP-SGD LSTM: same function as nn.LSTM, exact per-sample gradients and norms, accepted by Opacus."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule, PrivacyEngine
from torch import nn

from privfer.models.dp_lstm import FastDPLSTM



class Classifier(nn.Module):
    def __init__(self, features: int, hidden: int, layers: int, readout: str, fast: bool = True) -> None:
        super().__init__()
        self.rnn = FastDPLSTM(features, hidden, layers) if fast else nn.LSTM(features, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, 3)
        self.readout = readout

    def forward(self, x):
        states, _ = self.rnn(x)
        return self.head(states[:, -1] if self.readout == "last" else states.mean(dim=1))


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 6), t=st.integers(1, 9), d=st.integers(1, 7), h=st.integers(1, 6), layers=st.integers(1, 2),
       seed=st.integers(0, 1000))
def test_same_function_and_gradients_as_nn_lstm(b, t, d, h, layers, seed):
    torch.manual_seed(seed)
    lstm = nn.LSTM(d, h, layers, batch_first=True)
    fast = FastDPLSTM(d, h, layers).load_lstm_state(lstm)
    x = torch.randn(b, t, d)
    reference, _ = lstm(x)
    ours, (h_n, _) = fast(x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n[-1], reference[:, -1])
    weights = torch.randn_like(reference)
    (reference * weights).sum().backward()
    (ours * weights).sum().backward()
    for index, layer in enumerate(fast.layers):
        torch.testing.assert_close(layer.ih.weight.grad, getattr(lstm, f"weight_ih_l{index}").grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.hh.weight.grad, getattr(lstm, f"weight_hh_l{index}").grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.hh.bias.grad, getattr(lstm, f"bias_hh_l{index}").grad, rtol=1e-4, atol=1e-6)


def test_backward_passes_gradcheck():
    torch.manual_seed(0)
    model = FastDPLSTM(3, 2, num_layers=2).double()
    x = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inputs: model(inputs)[0], (x,))


def per_example_gradients(model: nn.Module, x, y):
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    return grads


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 6), t=st.integers(1, 8), h=st.integers(1, 8), layers=st.integers(1, 2),
       readout=st.sampled_from(["last", "mean"]), reduction=st.sampled_from(["sum", "mean"]), seed=st.integers(0, 999))
def test_per_sample_gradients_match_each_example_alone(b, t, h, layers, readout, reduction, seed):
    torch.manual_seed(seed)
    model = Classifier(5, h, layers, readout)
    x, y = torch.randn(b, t, 5), torch.randint(0, 3, (b,))
    expected = per_example_gradients(model, x, y)
    wrapped = GradSampleModule(model, loss_reduction=reduction)
    nn.functional.cross_entropy(wrapped(x), y, reduction=reduction).backward()
    for name, parameter in model.named_parameters():
        for i in range(b):
            got, want = parameter.grad_sample[i], expected[i][name]
            assert (got - want).norm() <= 1e-5 * want.norm() + 1e-7, (name, i)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 8), h=st.integers(1, 6), readout=st.sampled_from(["last", "mean"]),
       seed=st.integers(0, 999))
def test_ghost_norms_match_the_per_sample_gradient_norms(b, t, h, readout, seed):
    torch.manual_seed(seed)
    model = Classifier(4, h, 1, readout)
    x, y = torch.randn(b, t, 4), torch.randint(0, 3, (b,))
    expected = per_example_gradients(model, x, y)
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=1e9, use_ghost_clipping=True)
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    norms = wrapped.get_norm_sample()
    want = torch.stack([torch.sqrt(sum((g * g).sum() for g in e.values())) for e in expected])
    torch.testing.assert_close(norms, want, rtol=1e-4, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 6), t=st.integers(1, 7), h=st.integers(1, 5), layers=st.integers(1, 2),
       bound=st.sampled_from([1e-3, 0.05, 1e3]), seed=st.integers(0, 999))
def test_ghost_clipping_sums_the_clipped_per_example_gradients(b, t, h, layers, bound, seed):
    """Ghost clipping's second backward reuses the first pass's gate gradients: the result is still exact."""
    import privfer.models.dp_lstm as dp_lstm

    runs = []
    original = dp_lstm._backprop_through_time

    def counted(*args):
        runs.append(1)
        return original(*args)

    torch.manual_seed(seed)
    model = Classifier(4, h, layers, "last")
    x, y = torch.randn(b, t, 4), torch.randint(0, 3, (b,))
    expected = per_example_gradients(model, x, y)
    norms = torch.stack([torch.sqrt(sum((g * g).sum() for g in e.values())) for e in expected])
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
    private, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=0.0, max_grad_norm=bound, poisson_sampling=False, grad_sample_mode="ghost",
        criterion=nn.CrossEntropyLoss(reduction="sum"), loss_reduction="sum")
    optimizer.zero_grad()
    loss = criterion(private(x), y)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dp_lstm, "_backprop_through_time", counted)
        loss.backward()
    assert len(runs) == layers  # once per layer: the clipped pass rescales instead of running BPTT again
    for name, parameter in model.named_parameters():
        want = sum(f * e[name] for f, e in zip(factors, expected))
        torch.testing.assert_close(parameter.grad, want, rtol=1e-4, atol=1e-7)


def test_a_second_backward_with_other_gradients_is_recomputed():
    """Retaining the graph and backpropagating a different loss is not mistaken for a rescaled one."""
    torch.manual_seed(3)
    fast = Classifier(4, 3, 2, "mean")
    reference = Classifier(4, 3, 2, "mean", fast=False)
    fast.rnn.load_lstm_state(reference.rnn)
    fast.head.load_state_dict(reference.head.state_dict())
    x = torch.randn(4, 5, 4)
    losses = [lambda out: out.sum(), lambda out: (out**2).sum(), lambda out: 3 * out.sum()]
    out_fast, out_ref = fast(x), reference(x)
    for loss in losses:
        fast.zero_grad()
        reference.zero_grad()
        loss(out_fast).backward(retain_graph=True)
        loss(out_ref).backward(retain_graph=True)
        torch.testing.assert_close(fast.rnn.layers[1].hh.weight.grad, reference.rnn.weight_hh_l1.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.rnn.layers[0].ih.weight.grad, reference.rnn.weight_ih_l0.grad,
                                   rtol=1e-4, atol=1e-6)


def make_loader(n=64, t=6, d=5, batch=16):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, t, d), torch.randint(0, 3, (n,)))
    return torch.utils.data.DataLoader(data, batch_size=batch)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_make_private_accepts_the_model_and_trains(mode):
    from opacus.validators import ModuleValidator

    model = Classifier(5, 4, 1, "last")
    assert ModuleValidator.validate(model, strict=True) == []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine(accountant="rdp")
    before = [p.detach().clone() for p in model.parameters()]
    extra = {"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}
    made = engine.make_private(module=model, optimizer=optimizer, data_loader=make_loader(), noise_multiplier=1.0,
                               max_grad_norm=1.0, grad_sample_mode=mode, **extra)
    private, optimizer, loader = made[0], made[1], made[-1]
    criterion = made[2] if mode == "ghost" else nn.CrossEntropyLoss()
    for x, y in loader:
        optimizer.zero_grad()
        criterion(private(x), y).backward()
        optimizer.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert engine.get_epsilon(1e-5) > 0


def test_accounting_is_the_same_as_with_dplstm():
    from opacus.layers import DPLSTM

    histories = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = Classifier(5, 4, 1, "last", fast=fast)
        if not fast:
            model.rnn = DPLSTM(5, 4, batch_first=True)
        engine = PrivacyEngine(accountant="prv")
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=make_loader(),
            noise_multiplier=1.3, max_grad_norm=0.5)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(private(x), y).backward()
            optimizer.step()
        histories.append(engine.accountant.history)
    assert histories[0] == histories[1] and histories[0][0][:2] == (1.3, 16 / 64)


def test_each_example_is_clipped_to_the_bound():
    torch.manual_seed(0)
    model = Classifier(5, 4, 1, "last")
    engine = PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=make_loader(batch=64),
        noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(private(x), y, reduction="mean").backward()
    params = [p for p in private.parameters() if p.requires_grad]
    samples = [p.grad_sample.detach().clone() for p in params]
    norms = torch.stack([s.reshape(len(x), -1).norm(dim=1) ** 2 for s in samples]).sum(0).sqrt()
    assert norms.min() > 0.05  # every example needs clipping at this bound
    factors = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    optimizer.pre_step()  # clip and average, no noise
    for p, s in zip(params, samples):
        expected = torch.einsum("i,i...->...", factors, s) / len(x)
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)


class TwoViews(nn.Module):
    """The same LSTM applied to two halves of each clip in one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = FastDPLSTM(4, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        first, _ = self.rnn(x[:, :3])
        second, _ = self.rnn(x[:, 3:])
        return self.head(torch.cat([first[:, -1], second[:, -1]], dim=1))


@pytest.mark.parametrize("case", ["used twice", "no_grad forward in between", "frozen input projection", "tiny loss"])
def test_per_sample_gradients_survive_awkward_training_loops(case):
    torch.manual_seed(1)
    model = TwoViews() if case == "used twice" else Classifier(4, 3, 1, "last")
    if case == "frozen input projection":
        model.rnn.layers[0].ih.requires_grad_(False)
    x, y = torch.randn(5, 6, 4), torch.randint(0, 3, (5,))
    scale = 1e-30 if case == "tiny loss" else 1.0
    expected = []
    for i in range(len(x)):
        model.zero_grad()
        (scale * nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    wrapped = GradSampleModule(model, loss_reduction="mean")
    logits = wrapped(x)
    if case == "no_grad forward in between":
        with torch.no_grad():
            wrapped(torch.randn(5, 6, 4))
    (scale * nn.functional.cross_entropy(logits, y, reduction="mean")).backward()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        for i in range(len(x)):
            want = expected[i][name]
            assert (parameter.grad_sample[i] - want).norm() <= 1e-4 * want.norm() + 1e-37, (case, name, i)


def test_final_cell_state_matches_nn_lstm():
    torch.manual_seed(2)
    lstm = nn.LSTM(3, 2, 2, batch_first=True)
    fast = FastDPLSTM(3, 2, 2).load_lstm_state(lstm)
    x = torch.randn(4, 5, 3)
    _, (h_ref, c_ref) = lstm(x)
    _, (h, c) = fast(x)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)
