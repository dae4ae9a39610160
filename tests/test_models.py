import numpy as np
import pytest
import torch

from privfer.config import ModelConfig, load_config
from privfer.data.synthetic import generate_synthetic
from privfer.errors import DataError
from privfer.metrics import classification_report
from privfer.models.vfer import IFER, VFER, fit_ifer


def test_vfer_shapes_and_readouts():
    x = torch.randn(5, 7, 12)
    for readout in ("last", "mean", "both"):
        model = VFER.from_config(ModelConfig(hidden_size=9, readout=readout), feature_dim=12)
        assert model(x).shape == (5, 6)
        assert model.embed(x).shape == (5, 18 if readout == "both" else 9)
    states, _ = model.lstm(x)  # both: the last state, then the mean, each what its own readout gives
    torch.testing.assert_close(model.embed(x), torch.cat([states[:, -1], states.mean(dim=1)], dim=-1))
    with pytest.raises(ValueError, match="readout must be one of last, mean, both"):
        VFER(12, readout="max")
    with pytest.raises(ValueError, match=r"expected \(batch, frames, 12\)"):
        model(torch.randn(5, 7, 11))


def test_vfer_base_head_split():
    model = VFER(feature_dim=4, hidden_size=3)
    personal = model.personal_parameter_names(1)
    assert personal == ["head.weight", "head.bias"]
    all_names = {n for n, _ in model.named_parameters()}
    assert set(personal) < all_names and all(n.startswith("lstm.") for n in all_names - set(personal))
    with pytest.raises(ValueError, match="between 1 and 1"):
        model.personal_parameter_names(2)


def test_the_shortcut_starts_as_the_plain_vfer_and_is_shared_under_fedper():
    torch.manual_seed(0)
    plain = VFER(feature_dim=4, hidden_size=3)
    torch.manual_seed(0)
    short = VFER(feature_dim=4, hidden_size=3, shortcut=True)
    x = torch.randn(5, 6, 4)
    torch.testing.assert_close(short(x), plain(x))  # zero-initialised: the untrained model is the plain VFER
    with torch.no_grad():
        short.shortcut.weight.fill_(0.5)
    torch.testing.assert_close(short(x), plain(x) + 0.5 * x.mean(dim=1).sum(dim=1, keepdim=True))
    assert [g for g, _ in short.layer_groups()] == ["shortcut", "lstm layer 0", "head"]
    assert short.personal_parameter_names(1) == ["head.weight", "head.bias"]
    assert "shortcut.weight" not in short.personal_parameter_names(2)  # the LSTM and the head, not the shortcut
    config = load_config(None, ["privacy.epsilon=3"])
    assert config.model.shortcut is True and VFER.from_config(config.model, 4).shortcut is not None
    assert load_config(None, ["privacy.mechanism=local"]).model.shortcut is False  # the seed paper's model
    assert load_config(None, []).model.shortcut is True  # without DP, the distributed line's model (its ceiling)


@pytest.mark.parametrize("fast", [False, True])
def test_fedper_layers_are_counted_from_the_head_down_through_stacked_lstm_layers(fast):
    model = VFER(feature_dim=4, hidden_size=3, num_layers=2, fast_dp=fast)
    all_names = [n for n, _ in model.named_parameters()]
    assert model.personal_parameter_names(1) == ["head.weight", "head.bias"]
    two = model.personal_parameter_names(2)
    assert len(two) == 6 and all(n in all_names for n in two)
    assert all(("l1" in n or "layers.1." in n) for n in two[:4])
    assert not any(("l0" in n or "layers.0." in n) for n in two)
    with pytest.raises(ValueError, match="between 1 and 2"):
        model.personal_parameter_names(3)


def test_ifer_fits_frames_well_above_chance_on_unseen_actors():
    clips = generate_synthetic(load_config(None, ["data.frames=8", "data.synthetic.actors=24"]).data)
    seen, unseen = clips.for_actors(clips.actor_list()[:-4]), clips.for_actors(clips.actor_list()[-4:])
    ifer = fit_ifer(*seen.frame_level(), hidden=64, epochs=10, lr=1e-3, batch_size=256)
    probs = ifer.frame_probabilities(unseen.features)
    assert probs.shape == (*unseen.features.shape[:2], 6)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    frames, labels = unseen.frame_level()
    report = classification_report(labels, ifer(torch.from_numpy(frames)).argmax(-1).numpy())
    assert report["macro"]["f1"] > 0.45  # chance is about 1/6
    assert not any(p.requires_grad for p in ifer.parameters())


def test_ifer_weights_round_trip_and_errors(tmp_path):
    ifer = IFER(feature_dim=8, hidden=4).freeze()
    path = tmp_path / "ifer.pt"
    ifer.save(path)
    loaded = IFER.load(path, feature_dim=8, hidden=4)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), ifer(x))
    with pytest.raises(DataError, match="does not exist"):
        IFER.load(tmp_path / "missing.pt", feature_dim=8)
    with pytest.raises(DataError, match="does not fit an IFER with feature_dim=16, hidden=4"):
        IFER.load(path, feature_dim=16, hidden=4)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="cannot be read"):
        IFER.load(tmp_path / "junk.pt", feature_dim=8)


@pytest.mark.parametrize("readout,shortcut,layers", [("last", False, 1), ("mean", True, 2), ("both", True, 1)])
def test_the_stacked_forward_is_the_forward_of_each_stacked_model(readout, shortcut, layers):
    """VFER.stacked_forward (the stacked trainer's forward) computes, for K stacked parameter sets, exactly what
    each of the K models' own forward computes."""
    torch.manual_seed(0)
    models = [VFER(12, hidden_size=7, num_layers=layers, readout=readout, shortcut=shortcut) for _ in range(3)]
    for model in models:  # a shortcut starts at zero: give it weights, so it is exercised
        if model.shortcut is not None:
            torch.nn.init.normal_(model.shortcut.weight)
    frames = torch.randn(3, 5, 6, 12)
    params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
              for name, _ in models[0].named_parameters()}
    stacked = models[0].stacked_forward(params, frames)
    with torch.no_grad():
        each = torch.stack([model(frames[k]) for k, model in enumerate(models)])
    torch.testing.assert_close(stacked, each, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fast DP-SGD"):
        VFER(12, hidden_size=7, fast_dp=True).stacked_forward(params, frames)
