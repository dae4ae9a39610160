from pathlib import Path

import pytest
import yaml

from privfer.config import PrivferConfig, load_config
from privfer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_matches_builtin_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == PrivferConfig()


def test_every_shipped_config_is_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


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


@pytest.mark.parametrize("override", ["training.epochs", "training..epochs=3", "training.epochs.x=3"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_resolved_config_round_trips_through_yaml():
    config = load_config(None, ["seed=3", "data.root=/tmp/x", "data.source=cremad", "privacy.epsilon=2.5"])
    again = PrivferConfig.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_configuration_doc_lists_every_setting():
    from privfer.config import describe_fields

    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [row["field"] for row in describe_fields() if f"`{row['field']}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"
