from pathlib import Path

import pytest
import yaml

from privfer.config import PrivferConfig, load_config
from privfer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_matches_builtin_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == PrivferConfig()


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 3\n  lr: 0.01\n")
    config = load_config(path, ["training.epochs=7", "data.synthetic.seed=5", "privacy.epsilon=inf"])
    assert config.training.epochs == 7
    assert config.training.lr == 0.01
    assert config.data.synthetic.seed == 5
    assert config.privacy.epsilon == float("inf") and not config.privacy.enabled


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.lr=-1", "training.lr = -1: Input should be greater than 0 (allowed: > 0 and <= 10)"),
        ("data.frames=1", "data.frames = 1: Input should be greater than or equal to 2 (allowed: >= 2 and <= 1024)"),
        ("training.labels=soft", "training.labels = 'soft': Input should be 'partial' or 'discrete'"),
        ("aggregation.threshold_fraction=0.4", "aggregation.threshold_fraction = 0.4"),
        ("training.epochs=many", "training.epochs = 'many'"),
    ],
)
def test_invalid_values_name_the_field_and_range(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"training\.epoch: unknown setting"):
        load_config(None, ["training.epoch=3"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="root is required"):
        load_config(None, ["data.source=cremad"])
    with pytest.raises(ConfigError, match=r"min_annotators \(9\) must be <= max_annotators \(5\)"):
        load_config(None, ["data.synthetic.min_annotators=9", "data.synthetic.max_annotators=5"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("training: [1, 2\n", "is not valid YAML at line"),
        ("- a\n- b\n", "must hold a mapping of sections, not a list"),
    ],
)
def test_bad_yaml_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/privfer.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.epochs"], "must look like section.field=value"),
        (["training..epochs=3"], "has an empty field name"),
        (["training.epochs=3", "training.epochs.x=3"], "training.epochs is a value, not a section"),
        (["training.epochs=[1, 2"], "value is not valid YAML"),
        (["training.epochs.x=3"], r"training\.epochs = \{'x': 3\}|training.epochs"),
    ],
)
def test_malformed_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("override", ["training.epochs=true", "privacy.epsilon=yes", "seed=false"])
def test_booleans_are_not_numbers(override):
    with pytest.raises(ConfigError, match="expected a number, got the boolean"):
        load_config(None, [override])


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"training:\n  labels: \xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)


def test_data_root_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.source=cremad", "data.root=rel/CREMA-D"])
    assert config.data.root == tmp_path / "rel" / "CREMA-D"


def test_resolved_config_round_trips_through_yaml():
    config = load_config(None, ["seed=3", "data.root=/tmp/x", "data.source=cremad", "privacy.epsilon=2.5"])
    again = PrivferConfig.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_configuration_doc_lists_every_setting():
    from privfer.config import describe_fields

    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [row["field"] for row in describe_fields() if f"`{row['field']}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_aggregation_section_builds_a_checked_secagg_config():
    config = load_config(None, ["aggregation.graph=harary", "aggregation.modulus_bits=64",
                                "aggregation.security=semi_honest"])
    secagg = config.aggregation.secagg_config(num_clients=91)
    assert secagg.graph == "harary" and secagg.modulus_bits == 64 and secagg.num_clients == 91
    assert secagg.security == "semi_honest"
    # the default: active security on the complete graph; a sparse graph under it is refused, naming why
    default = load_config(None, []).aggregation.secagg_config(num_clients=91)
    assert default.security == "active" and default.graph == "complete"
    with pytest.raises(ConfigError, match="graph 'harary' cannot be used with aggregation.security 'active'"):
        load_config(None, ["aggregation.graph=harary"])
    with pytest.raises(ConfigError, match="cannot be used with security: 'active'"):  # the primitive says it too
        load_config(None, ["aggregation.graph=harary", "aggregation.security=semi_honest"]).aggregation \
            .model_copy(update={"security": "active"}).secagg_config(num_clients=91)
    with pytest.raises(ConfigError, match="aggregation.security 'active' needs aggregation.backend 'masking'"):
        load_config(None, ["aggregation.security=active", "aggregation.backend=ckks"])
    assert load_config(None, ["aggregation.backend=ckks"]).aggregation.resolved_security == "semi_honest"
    with pytest.raises(ConfigError, match="roster 'group' cannot be used"):
        load_config(None, ["aggregation.roster=group"])
    with pytest.raises(ConfigError, match="only -15 fractional bits fit for 60000 clients"):
        load_config(None, ["aggregation.clipping_range=1e9"]).aggregation.secagg_config(num_clients=60000)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_ready_config_loads(name):
    if name.startswith("study-"):
        from privfer.study import load_spec

        spec, cells = load_spec(REPO / "configs" / name)
        assert cells and spec.name == name.removeprefix("study-").removesuffix(".yaml")
        return
    config = load_config(REPO / "configs" / name)
    if name.startswith("fed"):
        assert config.federation.strategy == name.removesuffix(".yaml") and config.privacy.enabled


def test_a_mechanisms_own_settings_are_its_options_section(monkeypatch):
    """privacy.options is validated by the selected mechanism's Options model: the built-in mechanisms take none; a
    mechanism that declares options gets them validated, with errors naming the field, and typed on the config."""
    import dataclasses

    from pydantic import BaseModel, ConfigDict, Field

    from privfer.errors import ConfigError
    from privfer.privacy import mechanisms

    with pytest.raises(ConfigError, match=r"privacy.options.height: Extra inputs are not permitted .*takes: none"):
        load_config(None, ["privacy.epsilon=3", "privacy.options.height=4"])
    with pytest.raises(ConfigError, match=r"privacy.options.height"):  # a no-DP cell of the same line, too
        load_config(None, ["privacy.options.height=4"])

    class TreeOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        height: int = Field(3, ge=1, le=20)

    tree = dataclasses.replace(mechanisms.MECHANISMS["distributed"], Options=TreeOptions)
    monkeypatch.setitem(mechanisms.MECHANISMS, "distributed", tree)
    config = load_config(None, ["privacy.epsilon=3", "privacy.options.height=7"])
    assert config.mechanism_options == TreeOptions(height=7)
    assert load_config(None, ["privacy.epsilon=3"]).mechanism_options == TreeOptions(height=3)
    with pytest.raises(ConfigError, match=r"privacy.options.height: Input should be less than or equal to 20"):
        load_config(None, ["privacy.epsilon=3", "privacy.options.height=70"])
    assert load_config(None, []).mechanism_options is None  # no DP: no mechanism to read them
