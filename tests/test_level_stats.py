"""Per-level map standardisation ``M_l' = (M_l - mean_l) / std_l`` from training-normal statistics:
fitting, exactness without statistics, checkpoints, the evaluator and the exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_test_checkpoint
from ignite.engine import Events
from monai.data import DataLoader

from monai_skipts.checkpoint import load_checkpoint, load_detector
from monai_skipts.engines import LevelStatsFitter, SkipTSEvaluator, TeacherFeatureCache
from monai_skipts.inferers import (
    AnomalyMapHead,
    GaussianBlur2d,
    SkipTSInferer,
    anomaly_map_and_score,
    fit_level_stats,
    fuse_anomaly_maps,
    standardize_level_maps,
)
from monai_skipts.losses import anomaly_maps
from monai_skipts.networks import AnomalyDetector, SkipTS

SIZE = 64


def _model(seed=0):
    torch.manual_seed(seed)
    return SkipTS(teacher="resnet18", pretrained=False).eval()


def _detector(seed=0):
    return AnomalyDetector(_model(seed)).eval()


def _images(n=6, seed=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _items(x):
    return [{"image": im, "label": i % 2, "id": str(i)} for i, im in enumerate(x)]


def test_fit_gives_unit_statistics_on_the_fitting_data():
    model = _model().train()
    x = _images()
    # mixed batch forms: tensors, dicts, uneven sizes (the streaming merge must not care)
    stats = fit_level_stats(model, [x[:1], {"image": x[1:4]}, x[4:]])
    assert stats.shape == (3, 2) and stats.dtype == torch.float32 and bool((stats[:, 1] >= 1e-6).all())
    assert model.training  # mode restored
    with torch.no_grad():
        t, s = model.eval()(x)
    raw = anomaly_maps(t, s)
    for level, (m, m_std) in enumerate(zip(raw, standardize_level_maps(raw, stats))):
        ref = m.double()
        assert float(stats[level, 0]) == pytest.approx(float(ref.mean()), rel=1e-5)
        assert float(stats[level, 1]) == pytest.approx(float(ref.std(unbiased=False)), rel=1e-4)
        assert abs(float(m_std.double().mean())) < 1e-4
        assert float(m_std.double().std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(fit_level_stats(model, [x]), stats, rtol=1e-5, atol=0)  # one batch = many


def test_without_stats_the_map_is_bit_identical_to_eq7():
    det = _detector()
    x = _images(2)
    with torch.no_grad():
        t, s = det.features(x)
        ref = fuse_anomaly_maps(anomaly_maps(t, s), (SIZE, SIZE), GaussianBlur2d(4.0))
        assert det.get_level_stats() is None and tuple(det.level_stats.shape) == (0, 2)
        assert torch.equal(det(x)[0], ref)
        assert torch.equal(SkipTSInferer()(x, det), ref)
        assert torch.equal(anomaly_map_and_score(t, s, (SIZE, SIZE))[0], ref)
        det.set_level_stats(fit_level_stats(det, [x]))
        assert not torch.equal(det(x)[0], ref)
        det.set_level_stats(None)  # removed: back to eq 7
        assert det.get_level_stats() is None and torch.equal(det(x)[0], ref)


def test_standardised_head_and_layer_subsets_index_stats_by_level():
    model = _model()
    x = _images(2)
    stats = torch.tensor([[0.5, 0.1], [0.6, 0.05], [0.7, 0.02]])
    with torch.no_grad():
        t, s = model(x)
        raw = anomaly_maps(t, s)
        by_hand = [(m - mu) / sd for m, (mu, sd) in zip(raw, stats.tolist())]
        want = fuse_anomaly_maps(by_hand, (SIZE, SIZE), GaussianBlur2d(4.0))
        got, score = AnomalyMapHead()(t, s, (SIZE, SIZE), stats)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert torch.equal(score, got.flatten(1).amax(1))
        sub, _ = anomaly_map_and_score(t, s, (SIZE, SIZE), sigma=0, layers=(1, 3), level_stats=stats)
        ref = fuse_anomaly_maps([(raw[0] - 0.5) / 0.1, (raw[2] - 0.7) / 0.02], (SIZE, SIZE))
        torch.testing.assert_close(sub, ref, rtol=0, atol=1e-5)
        det = AnomalyDetector(model)
        det.set_level_stats(stats)
        torch.testing.assert_close(det(x)[0], want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="L >= 3"):
        standardize_level_maps(raw, stats[:2])
    with pytest.raises(ValueError, match="std > 0"):
        det.set_level_stats([[0.0, 0.0]] * 3)


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    model = _model()
    x = _images(3)
    stats = fit_level_stats(model, [x])
    path = save_test_checkpoint(tmp_path / "model.pt", model, threshold={"value": 1.0}, level_stats=stats)
    assert torch.equal(load_checkpoint(path)["state_dict"]["level_stats"], stats)
    torch.manual_seed(0)  # the random teacher (pretrained=False) is not in the checkpoint: rebuild the same
    loaded = load_detector(path, download=False)
    assert torch.equal(loaded.level_stats, stats) and "level_stats" in loaded.state_dict()
    det = AnomalyDetector(model).eval()
    det.set_level_stats(stats)
    with torch.no_grad():
        for a, b in zip(det(x), loaded(x)):
            assert torch.equal(a, b)
    # a checkpoint of a model without statistics has none, and its reload has none
    plain = save_test_checkpoint(tmp_path / "plain.pt", _model())
    assert tuple(load_checkpoint(plain)["state_dict"]["level_stats"].shape) == (0, 2)
    assert load_detector(plain, download=False).get_level_stats() is None


def test_evaluator_uses_the_fitted_stats_and_fitter_honours_cached_features():
    det = _detector()
    x = _images(4)
    fitter = LevelStatsFitter(det, DataLoader(_items(x), batch_size=3))
    stats = fitter()
    assert torch.equal(det.level_stats, stats) and torch.equal(fitter.stats, stats)
    # the trainer's teacher-feature cache: same statistics from cached features
    other = _detector()
    cache = TeacherFeatureCache(other.model)
    cached = LevelStatsFitter(other, DataLoader(_items(x), batch_size=3), prepare_batch=cache)()
    assert len(cache.store) == 4 and torch.allclose(cached, stats, rtol=1e-5, atol=0)
    assert LevelStatsFitter(det, [], enabled=False)() is None

    ev = SkipTSEvaluator(
        "cpu", DataLoader(_items(x), batch_size=4), det, amp=False, channels_last=False
    )  # NCHW: exact reference
    out = []
    ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out.append(e.state.output))
    ev.run()
    with torch.no_grad():
        want_map, want_score = det(x)
        raw_map, _ = AnomalyDetector(det.model)(x)
    torch.testing.assert_close(out[0]["pred"], want_map, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0]["score"], want_score, rtol=0, atol=1e-6)
    assert not torch.allclose(out[0]["pred"], raw_map)


def test_exports_carry_the_stats(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from monai_skipts.export import export_onnx, export_torchscript, load_torchscript, read_onnx_metadata

    det = _detector()
    det.set_level_stats(fit_level_stats(det, [_images(4)]))
    stats = det.level_stats.clone()
    x = _images(3, seed=7)
    with torch.no_grad():
        want_map, want_score = det(x)
        raw_map, _ = AnomalyDetector(det.model)(x)
    assert not torch.allclose(want_map, raw_map, atol=1e-2)

    ts_path = export_torchscript(det, tmp_path / "m.ts", SIZE)  # verified against eager (atol 1e-4)
    ts, meta, _ = load_torchscript(ts_path)
    with torch.no_grad():
        ts_map, ts_score = ts(x)
    torch.testing.assert_close(ts_map, want_map, rtol=0, atol=1e-4)
    torch.testing.assert_close(ts_score, want_score, rtol=0, atol=1e-4)
    assert np.allclose(meta["level_stats"], stats.numpy())

    onnx_path = export_onnx(det, tmp_path / "m.onnx", SIZE)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = sess.run(["anomaly_map", "score"], {"image": x.numpy()})
    np.testing.assert_allclose(onnx_map, want_map.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_score, want_score.numpy(), rtol=0, atol=1e-4)
    assert np.allclose(read_onnx_metadata(onnx_path)["level_stats"], stats.numpy())
    assert np.allclose(json.loads(sess.get_modelmeta().custom_metadata_map["level_stats"]), stats.numpy())

    # a whole checkpoint handed to a fresh detector (monai.bundle ckpt_export) sets the stats
    path = save_test_checkpoint(tmp_path / "model.pt", det.model, level_stats=stats)
    fresh = _detector()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.level_stats, stats)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], want_map, rtol=0, atol=1e-6)
