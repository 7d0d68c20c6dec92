"""Audio front-end, DCASE/audio-folder loaders, feature cache, bad files, spoken-digits demo."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
librosa = pytest.importorskip("librosa")

from l2bn.data import DataNotFoundError, load_dataset  # noqa: E402
from l2bn.data.audio import (  # noqa: E402
    AudioError,
    FrontEnd,
    deltas,
    load_audio,
    logmel,
    logmel_librosa,
    stack_deltas,
)
from l2bn.data.audio.cache import extract  # noqa: E402

SCENES = ["airport", "bus", "metro", "park", "street_traffic"]
DEVICES = ["a", "b", "c", "s1", "s4"]


def make_dcase(root: Path, sr: int = 44100, seconds: float = 0.5) -> Path:
    """The official development layout with a few short clips (tab-separated CSVs)."""
    (root / "audio").mkdir(parents=True)
    (root / "evaluation_setup").mkdir()
    rng = np.random.default_rng(0)
    meta, train, test = [], [], []
    for si, scene in enumerate(SCENES):
        for di, dev in enumerate(DEVICES):
            for k in range(2):
                name = f"audio/{scene}-barcelona-{si}{k}-{di}-{dev}.wav"
                t = np.arange(int(sr * seconds)) / sr
                y = 0.3 * np.sin(2 * np.pi * (300 + 400 * si) * t) + 0.05 * rng.standard_normal(
                    len(t)
                )
                sf.write(root / name, y.astype(np.float32), sr)
                meta.append((name, scene, f"barcelona-{si}{k}", dev))
                (test if (k == 1 and di % 2 == 0) else train).append((name, scene))
    with open(root / "meta.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filename", "scene_label", "identifier", "source_label"])
        w.writerows(meta)
    for fname, rows in (("fold1_train.csv", train), ("fold1_evaluate.csv", test)):
        with open(root / "evaluation_setup" / fname, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["filename", "scene_label"])
            w.writerows(rows)
    return root


def test_dcase_loader_split_labels_devices(tmp_path):
    root = make_dcase(tmp_path / "dcase")
    b = load_dataset("dcase2020-1a", str(root), seconds=0.5)
    n_test = len(SCENES) * 3  # k == 1 and devices a, c, s4
    assert len(b.test_y) == n_test and len(b.train_y) == len(SCENES) * len(DEVICES) * 2 - n_test
    assert b.classes == sorted(SCENES) and b.num_classes == 5
    assert sorted(set(b.test_groups)) == ["a", "c", "s4"]
    assert b.train_x.shape[1:] == (1, 128, 1 + int(44100 * 0.5) // 1024)
    rows = list(
        csv.DictReader(open(root / "evaluation_setup" / "fold1_evaluate.csv"), delimiter="\t")
    )
    assert [b.classes[int(i)] for i in b.test_y] == [r["scene_label"] for r in rows]
    assert (
        b.transform == "deltas" and b.augment == "tcrop400-each"
    )  # an independent crop per clip (Hu et al.)
    assert b.input_shape == (3, 128, b.train_x.shape[-1] - 8)


def test_dcase_missing_file_names_row(tmp_path):
    root = make_dcase(tmp_path / "dcase")
    victim = next((root / "audio").iterdir())
    victim.unlink()
    with pytest.raises(DataNotFoundError, match=f"names 'audio/{victim.name}'"):
        load_dataset("dcase2020-1a", str(root), seconds=0.5)


def test_logmel_matches_librosa_and_tone_band():
    fe = FrontEnd(seconds=1.0)
    rng = np.random.default_rng(0)
    y = (0.1 * rng.standard_normal(fe.n_samples)).astype(np.float32)
    ours = logmel(torch.from_numpy(y), fe)[0].numpy()
    ref = logmel_librosa(y, fe)
    assert ours.shape == ref.shape == (128, fe.n_frames)
    assert np.abs(ours - ref).max() < 2e-3
    # a pure 1 kHz tone peaks in the mel band whose centre is nearest 1 kHz
    t = np.arange(fe.n_samples) / fe.sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    lm = logmel(torch.from_numpy(tone), fe)[0]
    centres = librosa.mel_frequencies(n_mels=130, fmin=0, fmax=fe.sample_rate / 2, htk=True)[1:-1]
    expected = int(np.argmin(np.abs(centres - 1000.0)))
    assert abs(int(lm[:, 5:-5].mean(1).argmax()) - expected) <= 1
    assert float(lm.min()) == 0.0 and float(lm.max()) == 1.0  # per-clip min-max


def test_deltas_formula_and_stacking():
    x = torch.arange(20.0).reshape(1, 1, 1, 20) ** 2
    d = deltas(x)
    t = 5  # d[t-2] corresponds to frame t of x
    expect = (x[..., t + 1] - x[..., t - 1]) / 10 + (x[..., t + 2] - x[..., t - 2]) / 5
    assert torch.allclose(d[..., t - 2], expect)
    s = stack_deltas(torch.randn(2, 1, 8, 30))
    assert s.shape == (2, 3, 8, 22)


def test_stft_edge_padding_is_reflect_as_librosa_0_6():
    """Hu et al. ran librosa.feature.melspectrogram with the defaults of librosa 0.6/0.7:
    center=True, pad_mode="reflect". Both modes match librosa called with that mode; they differ
    in the edge frames only (here, where the clip's min and max are interior)."""
    assert FrontEnd().pad_mode == "reflect" and FrontEnd().cache_dtype == "float32"
    fe_r, fe_c = FrontEnd(seconds=1.0), FrontEnd(seconds=1.0, pad_mode="constant")
    rng = np.random.default_rng(1)
    y = (0.1 * rng.standard_normal(fe_r.n_samples)).astype(np.float32)
    r, c = (
        logmel(torch.from_numpy(y), fe_r)[0].numpy(),
        logmel(torch.from_numpy(y), fe_c)[0].numpy(),
    )
    assert (
        np.abs(r - logmel_librosa(y, fe_r)).max() < 2e-3
        and np.abs(c - logmel_librosa(y, fe_c)).max() < 2e-3
    )
    if r.argmin() % r.shape[1] not in (0, r.shape[1] - 1) and c.argmin() % c.shape[1] not in (
        0,
        c.shape[1] - 1,
    ):
        assert np.abs(r[:, 1:-1] - c[:, 1:-1]).max() < 1e-5
    assert np.abs(r[:, 0] - c[:, 0]).max() > 0.05 and np.abs(r[:, -1] - c[:, -1]).max() > 0.01
    with pytest.raises(ValueError, match="pad_mode"):
        FrontEnd(pad_mode="edge")
    assert FrontEnd(pad_mode="constant").key() != FrontEnd().key()  # a different cache file


def test_float16_storage_quantizes_the_deltas():
    """Why features are cached in float32: float16 rounds the [0, 1] log-mel to steps of up to
    2^-11, and the delta / delta-delta regressions inherit errors of that size."""
    fe = FrontEnd(seconds=2.0)
    y = torch.from_numpy(
        (0.1 * np.random.default_rng(2).standard_normal(fe.n_samples)).astype(np.float32)
    )
    lm = logmel(y, fe)[:, None]
    exact = stack_deltas(lm)
    assert torch.equal(stack_deltas(lm.float()), exact)
    half = stack_deltas(lm.half().float())
    err = (half - exact).abs()
    assert float(err[:, 0].max()) > 1e-4  # static: up to 2^-12
    assert (
        float(err[:, 2].max()) > 1e-5 and float(err[:, 2].max()) / float(exact[:, 2].std()) > 1e-3
    )


def test_feature_cache_is_float32(tmp_path):
    p = tmp_path / "c.wav"
    sf.write(p, (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32), 16000)
    fe = FrontEnd(sample_rate=16000, seconds=0.5, n_fft=512, hop_length=128, n_mels=32)
    assert extract([p], fe, tmp_path / "cache", progress=False).dtype == torch.float32


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    files = []
    for i in range(3):
        p = tmp_path / f"c{i}.wav"
        sf.write(
            p, (0.1 * np.random.default_rng(i).standard_normal(8000)).astype(np.float32), 16000
        )
        files.append(p)
    fe = FrontEnd(sample_rate=16000, seconds=0.5, n_fft=512, hop_length=128, n_mels=32)
    cache = tmp_path / "cache"
    a = extract(files, fe, cache, progress=False)
    assert len(list(cache.glob("logmel-*.pt"))) == 1
    import l2bn.data.audio.cache as cache_mod

    def boom(*args, **kw):
        raise AssertionError("audio was decoded again although the cache is valid")

    monkeypatch.setattr(cache_mod, "load_audio", boom)
    b = extract(files, fe, cache, progress=False)
    assert torch.equal(a, b)
    monkeypatch.undo()
    extract(
        files,
        FrontEnd(sample_rate=16000, seconds=0.5, n_fft=512, hop_length=128, n_mels=40),
        cache,
        progress=False,
    )
    assert len(list(cache.glob("logmel-*.pt"))) == 2  # a parameter change -> a new cache file
    sf.write(files[1], np.zeros(8000, dtype=np.float32), 16000)  # a changed file
    os.utime(files[1], ns=(1, 10**9 * 7))
    c = extract(files, fe, cache, progress=False)
    assert len(list(cache.glob("logmel-*.pt"))) == 3 and not torch.equal(c[1], a[1])


def test_bad_audio_files(tmp_path):
    fe = FrontEnd(sample_rate=16000, seconds=0.5)
    p = tmp_path / "sr.wav"
    sf.write(p, np.zeros(4000, dtype=np.float32), 8000)
    with pytest.raises(AudioError, match="sr.wav: sample rate 8000 Hz, expected 16000 Hz"):
        load_audio(p, fe)
    assert load_audio(p, FrontEnd(sample_rate=16000, seconds=0.5, resample=True)).shape == (8000,)
    st = tmp_path / "stereo.wav"
    sf.write(st, np.stack([np.ones(8000), -np.ones(8000) * 0.5], 1).astype(np.float32), 16000)
    assert np.allclose(load_audio(st, fe), 0.25, atol=1e-3)  # documented conversion: channel mean
    with pytest.raises(AudioError, match="stereo.wav: 2 channels, expected mono"):
        load_audio(st, FrontEnd(sample_rate=16000, seconds=0.5, stereo="error"))
    tr = tmp_path / "trunc.wav"
    sf.write(tr, np.ones(16000, dtype=np.float32) * 0.1, 16000, subtype="PCM_16")
    data = tr.read_bytes()
    tr.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="trunc.wav: truncated"):
        load_audio(tr, fe)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF0000WAVEnot really")
    with pytest.raises(AudioError, match="junk.wav: unreadable"):
        load_audio(junk, fe)
    with pytest.raises(AudioError, match="nothere.wav: audio file not found"):
        load_audio(tmp_path / "nothere.wav", fe)


def test_audio_folder_without_split(tmp_path):
    root = tmp_path / "af"
    (root / "clips").mkdir(parents=True)
    rows = []
    for i in range(20):
        name = f"clips/{i}.wav"
        sf.write(
            root / name,
            (0.1 * np.random.default_rng(i).standard_normal(16000)).astype(np.float32),
            16000,
        )
        rows.append((name, "yes" if i % 2 else "no"))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(rows)
    b = load_dataset("audio-folder", str(root), sample_rate=16000, seconds=1.0, n_mels=32)
    assert len(b.train_y) == 16 and len(b.test_y) == 4 and b.classes == ["no", "yes"]


def test_dcase_training_reports_per_device_accuracy(tmp_path):
    from l2bn.train import TrainConfig, train

    root = make_dcase(tmp_path / "dcase")
    os.environ["L2BN_BACKEND"] = "fused"
    try:
        res = train(
            TrainConfig(
                dataset="dcase2020-1a",
                data_dir=str(root),
                clip_seconds=0.5,
                model="audio-cnn",
                norm="l2bn",
                epochs=1,
                batch_size=8,
                lr=0.05,
                mixup=0.4,
                schedule="sgdr",
                out=str(tmp_path / "run"),
                progress=False,
                tensorboard=False,
                threads=1,
            )
        )
    finally:
        os.environ.pop("L2BN_BACKEND")
    assert sorted(res["per_group_acc"]) == ["a", "c", "s4"]
    # 5 test clips per device (one per scene): each device's accuracy is a multiple of 20 %, and the
    # overall accuracy is their mean (equal group sizes)
    accs = list(res["per_group_acc"].values())
    assert all(abs(v / 20 - round(v / 20)) < 1e-9 for v in accs), accs
    assert sum(accs) / 3 == pytest.approx(res["test_acc"], abs=1e-9)


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is installed by scripts/install.sh"
)
def test_spoken_digits_comparison_end_to_end(tmp_path):
    from l2bn.data.audio.spoken_digits import generate

    data = generate(str(tmp_path / "digits"), clips=600, snr_db=10.0, progress=False)
    rows = list(csv.DictReader(open(data / "labels.csv")))
    assert len(rows) == 600 and {r["label"] for r in rows} == {
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    }
    info = sf.info(str(data / rows[0]["filename"]))
    assert info.samplerate == 16000 and info.channels == 1 and abs(info.duration - 1.0) < 1e-3
    again = generate(
        str(tmp_path / "digits2"), clips=4, snr_db=10.0, progress=False
    )  # deterministic
    assert np.array_equal(
        sf.read(str(again / rows[0]["filename"]))[0], sf.read(str(data / rows[0]["filename"]))[0]
    )
    out = tmp_path / "cmp"
    env = dict(os.environ, L2BN_BACKEND="fused", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "l2bn",
            "compare",
            "--dataset",
            "spoken-digits",
            "--data-dir",
            str(data),
            "--models",
            "audio-cnn",
            "--seeds",
            "0",
            "1",
            "--epochs",
            "7",
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--no-progress",
            "--no-tensorboard",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["cells"]["audio-cnn/l2bn"]["n"] == 2 and s["cells"]["audio-cnn/bn"]["n"] == 2
    assert (
        s["cells"]["audio-cnn/bn"]["best_mean"] > 40
        and s["cells"]["audio-cnn/l2bn"]["best_mean"] > 40
    )  # chance: 10%
    assert (out / "report.html").is_file()
