"""`privfer data extract`: videos the tests make from a real face photograph (scikit-image's astronaut) -> features.

The face is pasted into every frame at a known, moving position, so the test
knows where the crop must be; the encoders are tiny TorchScript and ONNX
models built here, so the expected features can be computed independently.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

from typer.testing import CliRunner  # noqa: E402

from privfer.cli import app  # noqa: E402
from privfer.data.extract import (  # noqa: E402
    Encoder,
    EncoderError,
    ExtractionError,
    ExtractOptions,
    clip_crops,
    extract,
    sample_frames,
)

HEAD = skimage_data.astronaut()[20:220, 130:320]  # the astronaut's head: a face at about (47, 46) side 95
SIZE = 32  # crop side for the tests' encoders


def face_frames(count=12, scale=0.5, start=(10, 20), step=(9, 3), size=(240, 180), face=True):
    head = cv2.resize(HEAD, None, fx=scale, fy=scale)
    frames, centres = [], []
    for t in range(count):
        frame = np.full((size[1], size[0], 3), 90, np.uint8)
        x, y = start[0] + t * step[0], start[1] + t * step[1]
        if face:
            frame[y : y + head.shape[0], x : x + head.shape[1]] = head
        frames.append(frame)
        centres.append((x + (47 + 47) * scale, y + (46 + 47) * scale))  # the face's centre in this frame
    return frames, centres


def write_avi(path: Path, frames) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_flv(path: Path, frames) -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flv", rate=30)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def torchscript_encoder(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13; users still have such files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(net.eval(), torch.zeros(2, 3, SIZE, SIZE)), str(path))
    return path, net


def test_a_torch_export_encoder_works(tmp_path, torchscript_encoder):
    import torch

    _, net = torchscript_encoder
    program = torch.export.export(net, (torch.zeros(2, 3, SIZE, SIZE),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "encoder.pt2"
    torch.export.save(program, str(path))
    videos = tmp_path / "videos"
    videos.mkdir()
    write_avi(videos / "clip.avi", face_frames()[0])
    extract(videos, path, tmp_path / "out", OPTIONS)
    extract(videos, torchscript_encoder[0], tmp_path / "out-ts", OPTIONS)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "features" / "clip.npy"),
                               np.load(tmp_path / "out-ts" / "features" / "clip.npy"), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def onnx_encoder(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("enc") / "encoder.onnx"
    onnx.save(model, str(path))
    return path, weights


OPTIONS = ExtractOptions(frames=8, size=SIZE)


def save_scripted(module, path: Path) -> Path:
    """A TorchScript file (deprecated by torch 2.13; users still have such files)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_sampling_is_even_and_bounded():
    sampled, total = sample_frames((np.array([i]) for i in range(1000)), 8)
    assert total == 1000 and len(sampled) == 8
    # streaming keeps at most 4 x 8 frames, so each sample is within one kept stride (32) of its even target
    for frame, target in zip(sampled, np.linspace(0, 999, 8)):
        assert abs(int(frame[0]) - target) <= 32
    assert int(sampled[0][0]) == 0
    short, total = sample_frames((np.array([i]) for i in range(3)), 8)
    assert total == 3 and [int(f[0]) for f in short] == [0, 0, 1, 1, 1, 1, 2, 2]  # a short clip repeats frames
    assert sample_frames(iter([]), 8) == ([], 0)


def test_the_face_is_found_and_the_crop_follows_it(tmp_path):
    frames, centres = face_frames(count=12)
    video = write_avi(tmp_path / "1001_DFA_ANG_XX.avi", frames)
    crops, report = clip_crops(video, ExtractOptions(frames=12, size=SIZE))
    assert report.status == "failed" and report.error is None  # not yet encoded; nothing went wrong
    assert crops.shape == (12, SIZE, SIZE, 3) and report.faces_found == 12 and report.fallback == "none"
    for (x, y, side), (cx, cy) in zip(report.boxes, centres):
        assert abs(x + side / 2 - cx) < 8 and abs(y + side / 2 - cy) < 8  # the box is on the moving face
        assert 50 < side < 90  # the face (about 48 px) and its margin
    # the crop shows the face, not the grey background
    assert np.std(crops.astype(float)) > 20


def test_features_equal_the_encoder_applied_to_the_crops(tmp_path, torchscript_encoder):
    import torch

    path, net = torchscript_encoder
    videos = tmp_path / "videos"
    videos.mkdir()
    write_avi(videos / "1001_DFA_ANG_XX.avi", face_frames()[0])
    write_flv(videos / "1002_IEO_HAP_HI.flv", face_frames(start=(60, 10), step=(-4, 5))[0])
    manifest = extract(videos, path, tmp_path / "out", OPTIONS)
    assert manifest["summary"] == {"videos": 2, "ok": 2, "failed": 0} and manifest["feature_dim"] == 16
    for name, suffix in (("1001_DFA_ANG_XX", ".avi"), ("1002_IEO_HAP_HI", ".flv")):
        written = np.load(tmp_path / "out" / "features" / f"{name}.npy")
        crops, _ = clip_crops(videos / f"{name}{suffix}", OPTIONS)
        batch = (crops.astype(np.float32).transpose(0, 3, 1, 2) / 255.0 - np.array([0.485, 0.456, 0.406],
                 np.float32).reshape(1, 3, 1, 1)) / np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
        with torch.no_grad():
            expected = net(torch.from_numpy(batch.astype(np.float32))).numpy()
        assert written.shape == (8, 16) and written.dtype == np.float32
        np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-6)
        entry = manifest["clips"][name]
        assert entry["status"] == "ok" and entry["faces_found"] == 8 and entry["frames_decoded"] == 12


def test_an_onnx_encoder_works(tmp_path, onnx_encoder):
    path, weights = onnx_encoder
    videos = tmp_path / "videos"
    videos.mkdir()
    write_avi(videos / "clip.avi", face_frames()[0])
    options = ExtractOptions(frames=8, size=SIZE, normalize="unit")
    extract(videos, path, tmp_path / "out", options)
    crops, _ = clip_crops(videos / "clip.avi", options)
    expected = (crops.astype(np.float32) / 255.0).mean(axis=(1, 2)) @ weights
    np.testing.assert_allclose(np.load(tmp_path / "out" / "features" / "clip.npy"), expected, rtol=1e-4, atol=1e-5)


def test_corrupt_and_faceless_videos_are_reported_not_written(tmp_path, torchscript_encoder):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_avi(videos / "good.avi", face_frames()[0])
    (videos / "corrupt.mp4").write_bytes(os.urandom(5000))
    write_avi(videos / "noface.avi", face_frames(face=False)[0])
    write_avi(videos / "mostly_empty.avi", face_frames(count=12)[0][:3] + face_frames(count=9, face=False)[0])
    manifest = extract(videos, torchscript_encoder[0], tmp_path / "out", OPTIONS)
    clips = manifest["clips"]
    assert clips["good"]["status"] == "ok"
    assert clips["corrupt"]["status"] == "failed" and ("decode" in clips["corrupt"]["error"]
                                                        or "no frames" in clips["corrupt"]["error"])
    assert clips["noface"]["status"] == "failed" and "a face in 0 of 8" in clips["noface"]["error"]
    assert clips["mostly_empty"]["status"] == "failed" and "at least 50%" in clips["mostly_empty"]["error"]
    written = sorted(p.name for p in (tmp_path / "out" / "features").iterdir())
    assert written == ["good.npy"]
    assert json.loads((tmp_path / "out" / "extraction.json").read_text())["summary"]["failed"] == 3


def test_a_killed_extraction_resumes_and_other_options_are_refused(tmp_path, torchscript_encoder):
    videos = tmp_path / "videos"
    videos.mkdir()
    for k in range(3):
        write_avi(videos / f"clip{k}.avi", face_frames(start=(10 + 5 * k, 20))[0])
    out = tmp_path / "out"

    def killed(report):
        raise KeyboardInterrupt  # the run dies right after its first clip

    with pytest.raises(KeyboardInterrupt):
        extract(videos, torchscript_encoder[0], out, OPTIONS, on_clip=killed)
    first = out / "features" / "clip0.npy"
    assert first.exists() and not (out / "features" / "clip1.npy").exists()
    assert not [p for p in (out / "features").iterdir() if p.name.startswith(".")]  # no half-written file
    stamp = first.stat().st_mtime_ns
    seen = {}
    manifest = extract(videos, torchscript_encoder[0], out, OPTIONS,
                       on_start=lambda total, done: seen.update(total=total, done=done))
    assert seen == {"total": 3, "done": 1} and manifest["summary"]["ok"] == 3
    assert first.stat().st_mtime_ns == stamp  # skipped, not recomputed
    with pytest.raises(ExtractionError, match="other options"):
        extract(videos, torchscript_encoder[0], out, ExtractOptions(frames=6, size=SIZE))


def test_an_encoder_of_the_wrong_shape_is_a_clear_error(tmp_path):
    import torch

    class Spatial(torch.nn.Module):
        def forward(self, x):
            return x[:, :, :2, :2]  # (B, 3, 2, 2): not (B, D)

    path = save_scripted(Spatial(), tmp_path / "bad.pt")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_avi(videos / "clip.avi", face_frames()[0])
    with pytest.raises(EncoderError, match=r"to shape \(2, 3, 2, 2\); it must return \(2, D\)"):
        extract(videos, path, tmp_path / "out", OPTIONS)
    assert not (tmp_path / "out").exists()  # refused before anything was read or written
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(EncoderError, match="does not load as TorchScript"):
        Encoder(tmp_path / "junk.pt", OPTIONS)
    result = CliRunner().invoke(app, ["data", "extract", str(videos), "--encoder", str(path), "--out",
                                      str(tmp_path / "cli"), "--frames", "8", "--size", str(SIZE)])
    assert result.exit_code == 2 and "it must return (2, D)" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(app, ["data", "extract", str(videos), "--encoder", str(path), "--out",
                                   str(tmp_path / "cli2"), "--frames", "1"])
    assert bad.exit_code == 2 and "--frames must be in 2..256" in bad.output


def test_extracted_videos_train_end_to_end(tmp_path, torchscript_encoder):
    """CREMA-D's layout: root/VideoFlash/*.flv next to the metadata; extract, then `privfer train --data`."""
    runner = CliRunner()
    root = tmp_path / "CREMA-D"
    exported = runner.invoke(app, ["data", "export", str(root), "--set", "data.synthetic.actors=8",
                                   "--set", "data.frames=2", "--set", "data.feature_dim=2"])
    assert exported.exit_code == 0, exported.output
    names = sorted(p.stem for p in (root / "features").iterdir())
    for feature in (root / "features").iterdir():
        feature.unlink()
    (root / "features").rmdir()
    (root / "VideoFlash").mkdir()
    by_actor: dict[str, list[str]] = {}
    for name in names:
        by_actor.setdefault(name.split("_")[0], []).append(name)
    rng = np.random.default_rng(0)
    for clips in by_actor.values():
        for name in clips[:6]:
            x, y = (int(v) for v in rng.integers(5, 60, 2))
            write_avi(root / "VideoFlash" / f"{name}.avi", face_frames(count=8, start=(x, y), step=(3, 1))[0])
    dataset = tmp_path / "dataset"
    extracted = runner.invoke(app, ["data", "extract", str(root / "VideoFlash"), "--encoder",
                                    str(torchscript_encoder[0]), "--out", str(dataset), "--frames", "8",
                                    "--size", str(SIZE), "--workers", "2"])
    assert extracted.exit_code == 0, extracted.output
    assert "48 of 48 clips extracted (16 features x 8 frames)" in extracted.output
    assert (dataset / "VideoDemographics.csv").exists() and (dataset / "processedResults").is_dir()
    trained = runner.invoke(app, ["train", "--data", str(dataset), "--epochs", "1", "--set", "data.split.val_actors=2",
                                  "--set", "data.split.test_actors=2", "--set", "model.hidden_size=8",
                                  "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert "macro avg" in trained.output


def test_a_clip_the_encoder_fails_on_is_reported_and_the_others_extracted(tmp_path):
    import torch

    class DarkOnly(torch.nn.Module):
        def forward(self, x):
            mean = x.mean(dim=(1, 2, 3), keepdim=True).flatten(1)
            return torch.where(mean > 0.5, torch.full_like(mean, float("nan")), mean).repeat(1, 3)

    path = save_scripted(DarkOnly(), tmp_path / "dark.pt")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_avi(videos / "dark.avi", face_frames()[0])
    bright = [np.clip(f.astype(int) + 200, 0, 255).astype(np.uint8) for f in face_frames()[0]]
    write_avi(videos / "bright.avi", bright)
    options = ExtractOptions(frames=8, size=SIZE, face="none", normalize="unit")
    manifest = extract(videos, path, tmp_path / "out", options)
    assert manifest["clips"]["dark"]["status"] == "ok"
    assert manifest["clips"]["bright"]["status"] == "failed" and "NaN" in manifest["clips"]["bright"]["error"]
    assert not (tmp_path / "out" / "features" / "bright.npy").exists()


def test_a_folder_without_a_manifest_is_not_resumed_and_gone_videos_are_dropped(tmp_path, torchscript_encoder):
    videos = tmp_path / "videos"
    videos.mkdir()
    for k in range(2):
        write_avi(videos / f"clip{k}.avi", face_frames()[0])
    foreign = tmp_path / "foreign"
    (foreign / "features").mkdir(parents=True)
    np.save(foreign / "features" / "clip0.npy", np.zeros((8, 16), np.float32))
    with pytest.raises(ExtractionError, match="holds no extraction.json"):
        extract(videos, torchscript_encoder[0], foreign, OPTIONS)
    out = tmp_path / "out"
    extract(videos, torchscript_encoder[0], out, OPTIONS)
    (videos / "clip1.avi").unlink()
    manifest = extract(videos, torchscript_encoder[0], out, OPTIONS)
    assert set(manifest["clips"]) == {"clip0"} and not (out / "features" / "clip1.npy").exists()
    np.save(out / "features" / "clip0.npy", np.full((8, 16), np.nan, np.float32))  # damaged since
    assert extract(videos, torchscript_encoder[0], out, OPTIONS)["summary"]["ok"] == 1
    assert np.isfinite(np.load(out / "features" / "clip0.npy")).all()  # redone, not trusted


def test_the_box_does_not_smear_across_a_cut(tmp_path):
    left, _ = face_frames(count=6, start=(10, 30), step=(0, 0))
    right, _ = face_frames(count=6, start=(130, 30), step=(0, 0))
    video = write_avi(tmp_path / "cut.avi", left + right)
    _, report = clip_crops(video, ExtractOptions(frames=12, size=SIZE))
    centres = [x + side / 2 for x, _, side in report.boxes]
    face_left, face_right = 10 + 47, 130 + 47
    assert all(abs(c - face_left) < 6 for c in centres[:6]) and all(abs(c - face_right) < 6 for c in centres[6:])


def test_a_missing_video_stack_stops_the_run_once(tmp_path, torchscript_encoder, monkeypatch):
    import privfer.data.extract.decode as module

    videos = tmp_path / "videos"
    videos.mkdir()
    write_avi(videos / "clip.avi", face_frames()[0])

    def missing():
        raise ExtractionError('reading videos needs the "video" extra')

    monkeypatch.setattr(module, "video_stack", missing)
    with pytest.raises(ExtractionError, match="video"):
        extract(videos, torchscript_encoder[0], tmp_path / "out", OPTIONS)
    assert not (tmp_path / "out").exists()


def test_decoding_workers_are_spawned_not_forked(tmp_path, monkeypatch):
    """A forked decoder inherits FFmpeg's scaler with slice threads that exist only in the parent, and waits for
    them forever when it scales: CI hung so at 83% (stops 43-44, py-spy: two orphaned workers in
    avpriv_slicethread_execute). The workers are spawned, and their crops are those of the clips decoded here."""
    from privfer.data.extract import run

    contexts = []
    real = run.ProcessPoolExecutor

    def recording(*args, **kwargs):
        contexts.append(kwargs.get("mp_context"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "ProcessPoolExecutor", recording)
    paths = [write_avi(tmp_path / f"v{i}.avi", face_frames(count=8, start=(10 + 5 * i, 20))[0]) for i in range(3)]
    options = ExtractOptions(frames=4, size=SIZE)
    here = [clip_crops(path, options)[0] for path in paths]  # this process decodes first, as an earlier test would
    there = [crops for crops, _ in run._crops_of(paths, options, 2)]
    assert [c.get_start_method() for c in contexts] == ["spawn"]
    for mine, theirs in zip(here, there):
        np.testing.assert_array_equal(mine, theirs)
