"""The CREMA-D reader against a tiny folder written here in CREMA-D's exact layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from privfer.config import load_config
from privfer.data import load_clips
from privfer.data.cremad import export_cremad_layout, load_cremad
from privfer.data.synthetic import generate_synthetic
from privfer.errors import DataError

FRAMES, DIMS = 5, 4
CLIPS = ["1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_ITS_NEU_XX", "1002_IEO_SAD_LO"]
# Face-only vote counts (A, D, F, H, N, S) per clip; voice-only and audio-visual
# rows get different counts so a reader that mixes them up is caught.
FACE = {
    "1001_DFA_ANG_XX": [5, 2, 0, 0, 1, 0],
    "1001_IEO_HAP_HI": [0, 0, 0, 9, 1, 0],
    "1002_ITS_NEU_XX": [0, 0, 0, 0, 6, 2],
    "1002_IEO_SAD_LO": [0, 1, 1, 0, 3, 3],
}
VOICE = [1, 1, 1, 1, 1, 1]
AUDIOVISUAL = [0, 0, 7, 0, 0, 0]
TABULATED_HEADER = ["", "A", "D", "F", "H", "N", "S", "fileName", "numResponses", "agreement", "emoVote",
                    "meanEmoResp", "meanIntResp"]


def write_fixture(root: Path, clips=CLIPS) -> Path:
    (root / "processedResults").mkdir(parents=True)
    (root / "features").mkdir()
    with (root / "VideoDemographics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ActorID", "Age", "Sex", "Race", "Ethnicity"])
        w.writerow([1001, 51, "Male", "Caucasian", "Not Hispanic"])
        w.writerow([1002, 21, "Female", "Caucasian", "Not Hispanic"])
    with (root / "processedResults" / "tabulatedVotes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TABULATED_HEADER)
        for number, name in enumerate(clips, start=1):
            for query, counts in ((1, VOICE), (2, FACE[name]), (3, AUDIOVISUAL)):
                w.writerow([100000 * query + number, *counts, name, sum(counts), 0.5, "A", 1.0, 50])
    with (root / "finishedResponses.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "localid", "pos", "ans", "ttr", "queryType", "numTries", "clipNum", "questNum", "subType",
                    "clipName", "sessionNums", "respEmo", "respLevel", "dispEmo", "dispVal", "dispLevel"])
        row = 0
        for number, name in enumerate(clips, start=1):
            for query, counts in ((1, VOICE), (2, FACE[name]), (3, AUDIOVISUAL)):
                for cls, count in enumerate(counts):
                    for _ in range(count):
                        row += 1
                        w.writerow([row, "x", 1, "A", 2000, query, 1, number, 1, 1, name, 1, "ADFHNS"[cls], 50,
                                    name.split("_")[2][0], 50, "LO"])
    rng = np.random.default_rng(0)
    for name in clips:
        np.save(root / "features" / f"{name}.npy", rng.standard_normal((FRAMES, DIMS)).astype(np.float32))
    return root


@pytest.fixture
def cremad(tmp_path):
    return write_fixture(tmp_path / "CREMA-D")


@pytest.mark.parametrize("votes", ["tabulated", "responses"])
def test_reads_face_only_votes(cremad, votes):
    clips = load_cremad(cremad, votes=votes)
    assert sorted(clips.names.tolist()) == sorted(CLIPS)
    for name, counts in zip(clips.names, clips.votes):
        assert counts.tolist() == FACE[name]
    assert clips.features.shape == (4, FRAMES, DIMS)
    assert {a.actor_id: a.sex for a in clips.actors.values()} == {1001: "Male", 1002: "Female"}
    by_name = dict(zip(clips.names, clips.intended))
    assert by_name["1001_DFA_ANG_XX"] == 0 and by_name["1002_IEO_SAD_LO"] == 5
    np.testing.assert_array_equal(
        clips.features[list(clips.names).index("1002_ITS_NEU_XX")], np.load(cremad / "features" / "1002_ITS_NEU_XX.npy")
    )
    assert clips.frame_labels is None


def test_load_clips_uses_the_folder_from_the_config(cremad):
    config = load_config(None, ["data.source=cremad", f"data.root={cremad}", "data.votes=responses"])
    assert len(load_clips(config.data)) == 4


def test_only_clips_with_features_are_used(cremad):
    (cremad / "features" / "1001_DFA_ANG_XX.npy").unlink()
    clips = load_cremad(cremad)
    assert "1001_DFA_ANG_XX" not in clips.names and len(clips) == 3


def _rewrite(path: Path, transform) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(transform(lines)) + "\n")


BAD_INPUTS = {
    "missing demographics": (lambda r: (r / "VideoDemographics.csv").unlink(), "VideoDemographics.csv is missing"),
    "missing votes file": (
        lambda r: (r / "processedResults" / "tabulatedVotes.csv").unlink(), "tabulatedVotes.csv is missing"
    ),
    "missing features folder": (
        lambda r: [p.unlink() for p in (r / "features").glob("*")] and (r / "features").rmdir(), "features is missing"
    ),
    "empty features folder": (lambda r: [p.unlink() for p in (r / "features").glob("*")], "holds no .npy"),
    "missing vote column": (
        lambda r: _rewrite(r / "processedResults" / "tabulatedVotes.csv",
                           lambda ls: [",".join(x.split(",")[:5] + x.split(",")[6:]) for x in ls]),
        r"tabulatedVotes.csv lacks column\(s\) N",
    ),
    "missing demographics column": (
        lambda r: _rewrite(r / "VideoDemographics.csv", lambda ls: [x.replace("Sex", "Gender") for x in ls]),
        r"VideoDemographics.csv lacks column\(s\) Sex",
    ),
    "unknown clip name in features": (
        lambda r: np.save(r / "features" / "1001_DFA_XYZ_XX.npy", np.zeros((FRAMES, DIMS))),
        r"1001_DFA_XYZ_XX.npy: clip name '1001_DFA_XYZ_XX': unknown emotion 'XYZ'",
    ),
    "unknown clip name in votes": (
        lambda r: _rewrite(r / "processedResults" / "tabulatedVotes.csv",
                           lambda ls: ls + ["200099,1,0,0,0,0,0,1001_FOO_ANG_XX,1,1,A,1,50"]),
        r"tabulatedVotes.csv line 14: clip name '1001_FOO_ANG_XX': unknown sentence 'FOO'",
    ),
    "ragged feature shapes": (
        lambda r: np.save(r / "features" / "1002_ITS_NEU_XX.npy", np.zeros((FRAMES + 1, DIMS), np.float32)),
        r"1002_ITS_NEU_XX.npy has shape \(6, 4\), but \d+ of the \d+ clips have \(5, 4\) \(1 clips differ\)",
    ),
    "ragged feature shapes, the first file odd": (
        lambda r: np.save(sorted((r / "features").glob("*.npy"))[0], np.zeros((FRAMES + 1, DIMS), np.float32)),
        r"features/\d{4}_[A-Z]{3}_[A-Z]{3}_[A-Z]{2}.npy has shape \(6, 4\), but .* \(1 clips differ\)",
    ),
    "feature file not 2-d": (
        lambda r: np.save(r / "features" / "1001_DFA_ANG_XX.npy", np.zeros(FRAMES)),
        r"1001_DFA_ANG_XX.npy must be a non-empty real-valued frames x dims array",
    ),
    "feature file with no frames": (
        lambda r: [np.save(p, np.zeros((0, DIMS), np.float32)) for p in (r / "features").glob("*.npy")],
        r"must be a non-empty real-valued frames x dims array, got shape \(0, 4\)",
    ),
    "complex features": (
        lambda r: np.save(r / "features" / "1001_DFA_ANG_XX.npy", np.zeros((FRAMES, DIMS), np.complex64)),
        "non-empty real-valued",
    ),
    "empty feature file": (
        lambda r: (r / "features" / "1001_DFA_ANG_XX.npy").write_bytes(b""),
        "1001_DFA_ANG_XX.npy is not a readable .npy array",
    ),
    "infinite vote count": (
        lambda r: _rewrite(r / "processedResults" / "tabulatedVotes.csv",
                           lambda ls: ls[:2] + [ls[2].replace("200001,5,", "200001,inf,")] + ls[3:]),
        "tabulatedVotes.csv line 3: vote count A 'inf' is not a non-negative whole number",
    ),
    "fractional vote count": (
        lambda r: _rewrite(r / "processedResults" / "tabulatedVotes.csv",
                           lambda ls: ls[:2] + [ls[2].replace("200001,5,", "200001,5.7,")] + ls[3:]),
        "tabulatedVotes.csv line 3: vote count A '5.7' is not a non-negative whole number",
    ),
    "duplicate actor": (
        lambda r: _rewrite(r / "VideoDemographics.csv", lambda ls: ls + [ls[1].replace("Male", "Female")]),
        "VideoDemographics.csv line 4: ActorID 1001 is listed twice",
    ),
    "corrupt feature file": (
        lambda r: (r / "features" / "1001_DFA_ANG_XX.npy").write_bytes(b"garbage"),
        "1001_DFA_ANG_XX.npy is not a readable .npy array",
    ),
    "NaN features": (
        lambda r: np.save(r / "features" / "1001_DFA_ANG_XX.npy", np.full((FRAMES, DIMS), np.nan, np.float32)),
        "1001_DFA_ANG_XX.npy contains NaN",
    ),
    "clip without face-only votes": (
        lambda r: np.save(r / "features" / "1002_TIE_FEA_XX.npy", np.zeros((FRAMES, DIMS), np.float32)),
        r"tabulatedVotes.csv has no visual-only \(queryType 2\) votes for clip 1002_TIE_FEA_XX",
    ),
    "actor without demographics": (
        lambda r: np.save(r / "features" / "1050_TIE_FEA_XX.npy", np.zeros((FRAMES, DIMS), np.float32)),
        "actor 1050 is not in .*VideoDemographics.csv",
    ),
    "bad sex": (
        lambda r: _rewrite(r / "VideoDemographics.csv", lambda ls: [x.replace("Female", "F") for x in ls]),
        "VideoDemographics.csv line 3: Sex must be Male or Female",
    ),
    "non-numeric row id": (
        lambda r: _rewrite(r / "processedResults" / "tabulatedVotes.csv",
                           lambda ls: ls[:1] + ["abc" + x[6:] for x in ls[1:2]] + ls[2:]),
        "tabulatedVotes.csv line 2: row id 'abc' is not a number",
    ),
    "infinite row id": (
        lambda r: _rewrite(r / "processedResults" / "tabulatedVotes.csv",
                           lambda ls: ls[:1] + ["inf" + x[6:] for x in ls[1:2]] + ls[2:]),
        "tabulatedVotes.csv line 2: row id 'inf' is not a non-negative whole number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_clear_errors_naming_the_file(cremad, case):
    damage, message = BAD_INPUTS[case]
    damage(cremad)
    with pytest.raises(DataError, match=message):
        load_cremad(cremad)


def test_bad_responses_file(cremad):
    path = cremad / "finishedResponses.csv"
    _rewrite(path, lambda ls: ls[:1] + [x.replace(",A,50,", ",Q,50,", 1) if ",2,1," in x else x for x in ls[1:]])
    with pytest.raises(DataError, match=r"finishedResponses.csv line \d+: respEmo 'Q'"):
        load_cremad(cremad, votes="responses")


def test_missing_folder():
    with pytest.raises(DataError, match="CREMA-D folder /no/such/folder does not exist"):
        load_cremad("/no/such/folder")


def test_export_refuses_existing_folders_and_leaves_nothing_on_failure(tmp_path):
    synthetic = generate_synthetic(load_config(None, ["data.frames=2", "data.feature_dim=2",
                                                      "data.synthetic.actors=4"]).data)
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="already exists"):
        export_cremad_layout(synthetic, tmp_path / "taken")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="cannot create"):
        export_cremad_layout(synthetic, tmp_path / "afile" / "sub")
    broken = synthetic.subset(np.arange(3))
    broken.names = np.array(["a/b/c", "x", "y"])  # a name that cannot be a file: the write fails midway
    with pytest.raises(DataError, match="cannot write"):
        export_cremad_layout(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "taken"]


def test_synthetic_data_round_trips_through_the_layout(tmp_path):
    synthetic = generate_synthetic(load_config(None, ["data.frames=3", "data.feature_dim=5",
                                                      "data.synthetic.actors=5"]).data)
    loaded = load_cremad(export_cremad_layout(synthetic, tmp_path / "export"))
    order = np.argsort(synthetic.names)
    np.testing.assert_array_equal(loaded.names, synthetic.names[order])
    np.testing.assert_array_equal(loaded.features, synthetic.features[order])
    np.testing.assert_array_equal(loaded.votes, synthetic.votes[order])
    np.testing.assert_array_equal(loaded.intended, synthetic.intended[order])
    assert {a: v.sex for a, v in loaded.actors.items()} == {a: v.sex for a, v in synthetic.actors.items()}


def test_frames_and_feature_dim_come_from_the_features(cremad):
    config = load_config(None, ["data.source=cremad", f"data.root={cremad}"])
    assert config.data.frames is None and config.data.feature_dim is None
    load_clips(config.data)
    # filled in, so a run's config.yaml states the shape it really trained on
    assert (config.data.frames, config.data.feature_dim) == (FRAMES, DIMS)
    assert "frames: 5" in config.to_yaml()
    matching = load_config(None, ["data.source=cremad", f"data.root={cremad}", f"data.frames={FRAMES}"])
    assert len(load_clips(matching.data)) == 4


@pytest.mark.parametrize("setting", ["data.frames=8", "data.feature_dim=16"])
def test_a_shape_setting_the_features_contradict_is_an_error(cremad, setting):
    config = load_config(None, ["data.source=cremad", f"data.root={cremad}", setting])
    field = setting.split("=")[0]
    with pytest.raises(DataError, match=f"{field} = {setting.split('=')[1]}, but the features .* have"):
        load_clips(config.data)


def test_the_cli_refuses_a_contradicted_frames_setting_in_one_line(cremad, tmp_path):
    from typer.testing import CliRunner

    from privfer.cli import app

    result = CliRunner().invoke(app, ["train", "--data", str(cremad), "--set", "data.frames=8",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "data.frames = 8, but the features" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_synthetic_shape_defaults_are_stated():
    config = load_config(None, [])
    assert (config.data.frames, config.data.feature_dim) == (16, 256)
