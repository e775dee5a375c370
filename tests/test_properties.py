"""Property tests (hypothesis): whatever an image holds -- any shape, uint8/uint16/int16/float32,
constant, NaN or inf -- preprocessing and scoring give a valid finite result or a clear error that
names the file; never a silent NaN."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from monai.data import MetaTensor

from monai_skipts.calibration import calibrate_threshold
from monai_skipts.handlers import AnomalyScoreHandler
from monai_skipts.inferers import GaussianBlur2d, SkipTSInferer, anomaly_map_and_score
from monai_skipts.metrics import normalize_score
from monai_skipts.transforms import EXTRA_META, PRESETS, LoadMedicalImage, build_preprocessing, preset_transforms
from monai_skipts.utils import InputDataError

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
DTYPES = {"uint8": (0, 255), "uint16": (0, 65535), "int16": (-32768, 32767), "float32": (math.nan, math.nan)}
SIZE = 32
BIG = float(np.float32(1e30))


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def images(draw, allow_nonfinite: bool = True):
    """``(array (C, H, W), dtype name)``: random shape and dtype; some constant, some with NaN/inf."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = (draw(st.sampled_from([1, 3])), draw(st.integers(2, 40)), draw(st.integers(2, 40)))
    kind = draw(st.sampled_from(["random", "constant", "extremes"] + (["nonfinite"] if allow_nonfinite else [])))
    if dtype == "float32":
        if kind == "nonfinite":
            elems = st.floats(-1e6, 1e6, width=32) | st.sampled_from([math.nan, math.inf, -math.inf])
        else:
            elems = st.floats(-BIG, BIG, width=32) if kind == "extremes" else st.floats(-1e4, 1e4, width=32)
        arr = draw(hnp.arrays(np.float32, shape, elements=elems))
        if kind == "nonfinite":
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    else:
        info = np.iinfo(dtype)
        if kind == "extremes":
            arr = draw(hnp.arrays(dtype, shape, elements=st.sampled_from([int(info.min), int(info.max)])))
        else:
            arr = draw(hnp.arrays(dtype, shape, elements=st.integers(int(info.min), int(info.max))))
    if kind == "constant":
        arr = np.full(shape, arr.flat[0], dtype=arr.dtype)
    return arr, dtype


def _loaded(arr: np.ndarray, dtype: str, source_format: str) -> MetaTensor:
    """What LoadMedicalImage hands on: float32 MetaTensor with the representable range in meta."""
    lo, hi = DTYPES[dtype]
    meta = {
        **EXTRA_META,
        "filename_or_obj": "/data/case.dcm",
        "source_format": source_format,
        "value_min": lo,
        "value_max": hi,
        "window_center": 40.0,
        "window_width": 400.0,
    }
    return MetaTensor(torch.from_numpy(arr.astype(np.float32)), meta=meta)


def _input_error(err: Exception) -> InputDataError:
    """The InputDataError behind ``err`` (MONAI's Compose re-raises as ``RuntimeError(...) from e``)."""
    while err is not None and not isinstance(err, InputDataError):
        err = err.__cause__
    assert err is not None, "a failure that is not a clear InputDataError"
    return err


def _assert_clear_error(err: Exception, path: str) -> None:
    err = _input_error(err)
    assert path in str(err) and re.search(r"NaN|inf|finite", str(err)), str(err)


@SETTINGS
@given(img=images(), modality=st.sampled_from(PRESETS), source=st.sampled_from(["dicom", "picture", "nifti"]))
def test_preset_chains_give_finite_images_or_clear_errors(img, modality, source):
    arr, dtype = img
    chain = build_preprocessing(modality, SIZE, load=False)
    try:
        out = chain({"image": _loaded(arr, dtype, source)})["image"]
    except (InputDataError, RuntimeError) as e:
        assert not np.isfinite(arr).all(), f"finite {dtype} image refused: {_input_error(e)}"
        _assert_clear_error(e, "/data/case.dcm")
        return
    assert np.isfinite(arr).all(), "an image with NaN/inf went through preprocessing silently"
    assert tuple(out.shape) == (3, SIZE, SIZE)
    assert torch.isfinite(out).all()
    # [0, 1] before ImageNet normalisation -> bounded after it
    assert float(out.min()) >= (0 - 0.485) / 0.229 - 1e-4 and float(out.max()) <= (1 - 0.406) / 0.225 + 1e-4


@SETTINGS
@given(img=images(allow_nonfinite=False), modality=st.sampled_from(PRESETS))
def test_constant_images_become_a_constant_finite_input(img, modality):
    arr, dtype = img
    arr = np.full(arr.shape, arr.flat[0], dtype=arr.dtype)
    out = build_preprocessing(modality, SIZE, load=False)({"image": _loaded(arr, dtype, "dicom")})["image"]
    assert torch.isfinite(out).all()
    per_channel = out.flatten(1)
    assert torch.allclose(
        per_channel.min(1).values, per_channel.max(1).values, atol=1e-3
    )  # anti-aliasing wiggles ~1e-4


@st.composite
def files(draw, tmp_path):
    """A random image written as PNG (uint8/uint16), DICOM (uint16/int16) or NIfTI (float32)."""
    fmt = draw(st.sampled_from(["png8", "png16", "dcm_u16", "dcm_i16", "nii"]))
    h, w = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    constant = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if fmt == "nii":
        arr = rng.normal(0, 100, (h, w)).astype(np.float32)
    else:
        dtype = {"png8": np.uint8, "png16": np.uint16, "dcm_u16": np.uint16, "dcm_i16": np.int16}[fmt]
        info = np.iinfo(dtype)
        arr = rng.integers(int(info.min), int(info.max), (h, w), endpoint=True).astype(dtype)
    if constant:
        arr = np.full_like(arr, arr.flat[0])
    if fmt == "nii":
        bad = draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
        if bad is not None:  # one bad value: "replace" can fill it from the finite ones
            arr.flat[rng.integers(arr.size)] = bad
    path = tmp_path / f"case{draw(st.integers(0, 10**9))}"
    if fmt.startswith("png"):
        from PIL import Image

        path = path.with_suffix(".png")
        Image.fromarray(arr).save(path)
    elif fmt == "nii":
        import nibabel as nib

        path = path.with_suffix(".nii.gz")
        nib.save(nib.Nifti1Image(arr[:, :, None], np.eye(4)), str(path))
    else:
        path = path.with_suffix(".dcm")
        _write_dicom(path, arr)
    return path, arr


def _write_dicom(path, arr: np.ndarray) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, int(arr.dtype == np.int16)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, (-1024 if arr.dtype == np.uint16 else 0)
    ds.PixelData = arr.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@SETTINGS
@given(data=st.data(), modality=st.sampled_from(PRESETS))
def test_files_of_any_dtype_load_and_preprocess_to_finite_images_or_clear_errors(tmp_path, data, modality):
    path, arr = data.draw(files(tmp_path))
    chain = build_preprocessing(modality, SIZE)
    try:
        out = chain({"image": str(path)})["image"]
    except (InputDataError, RuntimeError) as e:
        assert not np.isfinite(arr).all(), f"{path.name}: {_input_error(e)}"
        _assert_clear_error(e, str(path))
        # nonfinite="replace": the loader replaces them and says how many
        img = LoadMedicalImage(nonfinite="replace")(str(path))
        assert torch.isfinite(img).all() and img.meta["nonfinite_replaced"] == int((~np.isfinite(arr)).sum())
        return
    assert np.isfinite(arr).all(), "NaN/inf in the file went through silently"
    assert tuple(out.shape) == (3, SIZE, SIZE) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# inferer


@SETTINGS
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 20), st.integers(1, 20)),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    sigma=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
)
def test_gaussian_blur_is_finite_bounded_and_matches_scipy(x, sigma):
    from scipy.ndimage import gaussian_filter

    y = GaussianBlur2d(sigma)(torch.from_numpy(x))
    assert y.shape == x.shape and torch.isfinite(y).all()
    tol = 1e-3 * max(1.0, float(np.abs(x).max()))
    assert float(y.min()) >= x.min() - tol and float(y.max()) <= x.max() + tol  # a weighted mean
    if sigma > 0:
        ref = np.stack(
            [[gaussian_filter(c.astype(np.float64), sigma, truncate=4.0, mode="reflect") for c in b] for b in x]
        )
        np.testing.assert_allclose(y.numpy(), ref, atol=tol)


def _features(draw, b: int, channels=(4, 6, 8), sizes=(8, 4, 2), nonfinite: bool = False):
    scale = draw(st.sampled_from([0.0, 1e-20, 1.0, 1e3, 1e15]))
    feats = []
    for c, s in zip(channels, sizes):
        arr = draw(hnp.arrays(np.float32, (b, c, s, s), elements=st.floats(-1, 1, width=32))) * np.float32(scale)
        feats.append(arr)
    if nonfinite:
        level = draw(st.integers(0, len(feats) - 1))
        feats[level].flat[draw(st.integers(0, feats[level].size - 1))] = draw(st.sampled_from([math.nan, math.inf]))
    return [torch.from_numpy(f) for f in feats]


@SETTINGS
@given(data=st.data(), size=st.sampled_from([(8, 8), (16, 12), (32, 32)]), sigma=st.sampled_from([0.0, 1.0, 4.0]))
def test_anomaly_map_and_score_are_finite_and_bounded(data, size, sigma):
    b = data.draw(st.integers(1, 3))
    t, s = _features(data.draw, b), _features(data.draw, b)
    amap, score = anomaly_map_and_score(t, s, size, sigma=sigma)
    assert amap.shape == (b, 1, *size) and score.shape == (b,)
    assert torch.isfinite(amap).all() and torch.isfinite(score).all()
    # 1 - cos is in [0, 2] per level; three levels summed, then a weighted mean (the blur)
    assert float(amap.min()) >= -1e-4 and float(score.max()) <= 6 + 1e-4
    assert torch.equal(score, SkipTSInferer.score(amap))
    # identical features: no anomaly anywhere (unless the features are all ~0: cosine undefined -> 1)
    same, _ = anomaly_map_and_score(t, [f.clone() for f in t], size, sigma=sigma)
    assert torch.isfinite(same).all()


def _engine(score, ids, labels=None, maps=None):
    out = {"score": score, "id": ids, "pred": maps if maps is not None else torch.zeros(len(ids), 1, 4, 4)}
    if labels is not None:
        out["label"] = torch.tensor(labels)
    return SimpleNamespace(state=SimpleNamespace(output=out, batch={}, metrics={}))


@SETTINGS
@given(data=st.data())
def test_score_handler_refuses_non_finite_scores_naming_the_image(data):
    """Non-finite features (a broken input that got past the loader) -> a clear error, never a NaN score."""
    b = data.draw(st.integers(1, 3))
    t, s = _features(data.draw, b, nonfinite=True), _features(data.draw, b)
    amap, score = anomaly_map_and_score(t, s, (16, 16))
    ids = [f"img{i}.dcm" for i in range(b)]
    handler = AnomalyScoreHandler()
    engine = _engine(score, ids, maps=amap)
    if torch.isfinite(score).all():  # e.g. inf in a pixel the max-pooled score never sees -> still must be finite
        handler._reset(engine)
        handler._collect(engine)
        assert all(math.isfinite(r["score"]) for r in handler.records)
        return
    handler._reset(engine)
    with pytest.raises(ValueError, match=r"img\d\.dcm: the anomaly score is not finite"):
        handler._collect(engine)


def _strict_json(path) -> dict:
    def refuse(name):
        raise AssertionError(f"{path.name} holds {name}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@SETTINGS
@given(
    scores=st.lists(st.floats(0, 10, width=32) | st.sampled_from([0.0, 1.0]), min_size=1, max_size=30),
    data=st.data(),
    threshold=st.none() | st.floats(0, 10),
    scale=st.none() | st.sampled_from([1e-6, 0.5, 2.0]),
)
def test_score_handler_metrics_are_finite_and_strict_json(tmp_path_factory, scores, data, threshold, scale):
    labels = data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores)))
    out = tmp_path_factory.mktemp("scores")
    handler = AnomalyScoreHandler(output_dir=out, threshold=threshold, score_scale=scale)
    engine = _engine(torch.tensor(scores), [f"i{k}" for k in range(len(scores))], labels)
    handler._reset(engine)
    handler._collect(engine)
    handler._complete(engine)
    metrics = _strict_json(out / "metrics.json")
    for k, v in metrics.items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)
    assert metrics["n_images"] == len(scores)
    if len(set(labels)) == 2:
        assert 0 <= metrics["auroc"] <= 1
    csv_text = (out / "scores.csv").read_text()
    assert "nan" not in csv_text.lower() and "inf" not in csv_text.lower()


@SETTINGS
@given(
    normals=st.lists(st.floats(0, 100, width=32), min_size=1, max_size=40),
    target_fpr=st.sampled_from([0.01, 0.05, 0.2, 0.5]),
    score=st.floats(0, 100, width=32),
)
def test_calibrated_threshold_and_normalised_score_are_finite(normals, target_fpr, score):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = calibrate_threshold(np.array(normals), target_fpr)
    assert math.isfinite(t)
    scale = max(float(np.std(normals)), 1e-6)
    assert math.isfinite(float(normalize_score(score, t, scale)))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_calibration_refuses_non_finite_scores(bad):
    with pytest.raises(ValueError, match="finite|NaN|inf"):
        calibrate_threshold(np.array([1.0, 2.0, bad]), 0.05)


def test_model_scores_constant_and_extreme_images_finitely():
    """The real model (offline teacher, untrained student) on constant, black, white and noisy images."""
    from monai_skipts.networks import AnomalyDetector, SkipTS

    torch.manual_seed(0)
    predictor = AnomalyDetector(SkipTS(teacher="efficientnet_lite0")).eval()
    chain = preset_transforms("xray", SIZE, load=False)
    raw = [np.zeros((1, 20, 20)), np.full((1, 20, 20), 4095.0), np.random.default_rng(0).integers(0, 4096, (1, 20, 20))]
    batch = []
    for arr in raw:
        d = {"image": _loaded(np.asarray(arr, np.float32), "uint16", "dicom")}
        for t in chain:
            d = t(d)
        batch.append(d["image"].as_tensor())
    with torch.inference_mode():
        amap, score = predictor(torch.stack(batch))
    assert torch.isfinite(amap).all() and torch.isfinite(score).all() and (score >= 0).all()
