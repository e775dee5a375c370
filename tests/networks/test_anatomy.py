"""The detector's anatomy mask: the body kept, thin marks outside it dropped, enclosed dark tissue
filled in; the detector's maps zero outside it and its score the maximum inside; the settings and the
scores survive the checkpoint and the TorchScript/ONNX exports; a detector without a mask is unchanged."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from monai_skipts.checkpoint import load_checkpoint, load_detector, save_checkpoint
from monai_skipts.inferers import AnomalyMapHead, GaussianBlur2d, fit_level_stats, fuse_anomaly_maps, mask_map_and_score
from monai_skipts.losses import anomaly_maps
from monai_skipts.networks import AnatomyMaskLayer, AnomalyDetector, SkipTS, anatomy_mask_config
from monai_skipts.networks import anatomy as anatomy_module

SIZE = 64


def _body(text_at=(2, 2), size=SIZE) -> torch.Tensor:
    """A grey image (3, S, S) in [0, 1]: an ellipse of textured tissue with a dark hole inside, and a
    white caption (PIL's font) at ``text_at`` (or none)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = size / 2
    inside = ((yy - c) / (0.3 * size)) ** 2 + ((xx - c) / (0.25 * size)) ** 2 <= 1
    img = torch.where(inside, 0.5 + 0.1 * torch.rand(size, size, generator=g), torch.zeros(size, size))
    hole = ((yy - c) ** 2 + (xx - c) ** 2) <= (0.06 * size) ** 2
    img[hole] = 0.0  # a dark cyst / ventricle inside the body
    if text_at is not None:
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).text(text_at, "L 3.5", fill=255, font=ImageFont.load_default())
        img = torch.where(torch.as_tensor(np.asarray(canvas) > 0), torch.ones(()), img)
    return img[None].repeat(3, 1, 1), inside


def test_docstring_examples_run():
    result = doctest.testmod(anatomy_module)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("method", ["nonzero", "otsu"])
def test_the_body_is_kept_the_hole_filled_and_a_caption_outside_dropped(method):
    img, inside = _body()
    caption = img[0] >= 1.0
    assert bool(caption.any()) and not bool((caption & inside).any())
    mask = AnatomyMaskLayer(method)(img[None])[0, 0] > 0
    assert mask[inside].float().mean() > 0.97  # the body and its dark hole
    assert not bool(mask[caption].any())  # the thin strokes of the caption outside it
    assert mask[~inside].float().mean() < 0.05


def test_the_mask_ignores_an_affine_intensity_scale_and_a_constant_image_is_all_anatomy():
    img, _ = _body()
    layer = AnatomyMaskLayer("nonzero")
    normalised = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / 0.229
    assert torch.equal(layer(img[None]), layer(normalised[None]))
    assert torch.equal(layer(torch.full((2, 3, 16, 16), 0.3)), torch.ones(2, 1, 16, 16))


def test_settings_resolve_per_modality_and_bad_ones_are_refused():
    assert anatomy_mask_config(True, "ct_lung")["method"] == "ct"
    assert anatomy_mask_config(True, "ultrasound")["method"] == "nonzero"
    assert anatomy_mask_config({"method": "otsu", "opening": 0.0}, "mri")["opening"] == 0.0
    assert anatomy_mask_config(None, "mri") is None and anatomy_mask_config(False, "mri") is None
    with pytest.raises(ValueError, match="needs a modality"):
        anatomy_mask_config(True, None)
    with pytest.raises(ValueError, match="unknown anatomy_mask settings"):
        anatomy_mask_config({"radius": 3}, "mri")
    with pytest.raises(ValueError, match="unknown anatomy mask method"):
        anatomy_mask_config({"method": "watershed"}, "mri")


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    model = SkipTS("resnet18", pretrained=False)
    prep = {"modality": "mri", "spatial_size": SIZE}
    plain = AnomalyDetector(model, preprocessing=prep).eval()
    masked = AnomalyDetector(model, preprocessing=prep, anatomy_mask=True).eval()
    return plain, masked


def test_maps_are_zero_outside_the_anatomy_and_the_score_is_the_maximum_inside(detectors):
    plain, masked = detectors
    img, _ = _body()
    x = torch.stack([img, img.flip(-1)])
    with torch.no_grad():
        plain_map, plain_score = plain(x)
        amap, score = masked(x)
        inside = masked.anatomy_mask(x) > 0
    assert masked.config["anatomy_mask"]["method"] == "nonzero" and plain.config["anatomy_mask"] is None
    assert bool((~inside).any()) and bool(inside.any())
    assert bool((amap[~inside] == 0).all())
    with torch.no_grad():  # the summed map zeroed outside, then blurred, then zeroed outside again
        raw, _ = AnomalyMapHead(0.0)(*plain.features(x), (SIZE, SIZE))
        want_map = GaussianBlur2d(4.0)(raw * inside) * inside
    torch.testing.assert_close(amap, want_map, rtol=0, atol=1e-6)
    want = torch.stack([amap[i][inside[i]].max() for i in range(2)])
    assert torch.equal(score, want)
    assert not torch.equal(amap[inside], plain_map[inside])  # plain: outside leaks in through the blur


def test_a_hot_spot_outside_the_anatomy_does_not_reach_the_map_inside_through_the_blur():
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 16:48] = 1
    cold = torch.rand(1, 1, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(0))
    hot = cold.clone()
    hot[..., 2, 4:8] = 50.0  # a caption just outside the anatomy (rows 6-13 after the up-sampling)
    head = AnomalyMapHead(4.0)
    fuse = [fuse_anomaly_maps([m], (SIZE, SIZE), head.blur, mask) for m in (cold, hot)]
    assert torch.equal(fuse[0][mask > 0], fuse[1][mask > 0])
    (a, sa), (b, sb) = (mask_map_and_score(f, mask) for f in fuse)
    assert torch.equal(a, b) and torch.equal(sa, sb) and bool((a[mask <= 0] == 0).all())
    leak = fuse_anomaly_maps([hot], (SIZE, SIZE), head.blur)  # masked after the blur only: it leaks in
    assert float(leak[mask > 0].max()) > 2 * float(sa)


def test_without_a_mask_the_detector_is_the_plain_head(detectors):
    plain, _ = detectors
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got = plain(x)
        want = AnomalyMapHead(4.0)(*plain.features(x), (SIZE, SIZE))
    assert plain.anatomy is None and plain.anatomy_mask(x) is None
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_level_statistics_are_fitted_inside_the_anatomy(detectors):
    plain, masked = detectors
    img, _ = _body()
    x = torch.stack([img, img.flip(-2)])
    got = fit_level_stats(masked, [x])
    with torch.no_grad():
        maps = anomaly_maps(*masked.features(x))
        inside = masked.anatomy_mask(x)
    for level, m in enumerate(maps):
        w = torch.nn.functional.interpolate(inside, size=m.shape[-2:], mode="area") >= 0.5
        v = m.double()[w]
        want = torch.stack([v.mean(), v.std(unbiased=False)]).float()
        torch.testing.assert_close(got[level], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, fit_level_stats(plain, [x]))


def test_checkpoint_and_exports_keep_the_mask_and_the_scores(tmp_path, detectors):
    ort = pytest.importorskip("onnxruntime")
    from monai_skipts.export import export_onnx, export_torchscript, load_torchscript, read_onnx_metadata

    _, masked = detectors
    masked.set_level_stats([[0.1, 0.05], [0.2, 0.05], [0.3, 0.05]])  # negative maps inside: zero is not the max
    img, _ = _body()
    x = torch.stack([img, img.flip(-1), torch.randn(3, SIZE, SIZE)])
    with torch.no_grad():
        want_map, want_score = masked(x)
    path = save_checkpoint(tmp_path / "m.pt", masked, with_rng=False)
    assert load_checkpoint(path)["config"]["anatomy_mask"] == masked.config["anatomy_mask"]
    torch.manual_seed(0)  # the same random teacher (not stored)
    back = load_detector(path).eval()
    assert back.config["anatomy_mask"] == masked.config["anatomy_mask"] and back.anatomy is not None
    with torch.no_grad():
        got_map, got_score = back(x)
    assert torch.equal(got_map, want_map) and torch.equal(got_score, want_score)

    ts, meta, _ = load_torchscript(export_torchscript(masked, tmp_path / "m.ts", SIZE, verify=False))
    assert meta["detector_config"]["anatomy_mask"] == masked.config["anatomy_mask"]
    with torch.no_grad():
        ts_map, ts_score = ts(x)
    torch.testing.assert_close(ts_map, want_map, rtol=0, atol=1e-4)
    torch.testing.assert_close(ts_score, want_score, rtol=0, atol=1e-4)
    assert bool((ts_map[want_map == 0] == 0).all())

    onnx_path = export_onnx(masked, tmp_path / "m.onnx", SIZE, verify=False)
    assert read_onnx_metadata(onnx_path)["detector_config"]["anatomy_mask"] == masked.config["anatomy_mask"]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = sess.run(["anomaly_map", "score"], {"image": x.numpy()})
    np.testing.assert_allclose(onnx_map, want_map.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_score, want_score.numpy(), rtol=0, atol=1e-4)
    masked.set_level_stats(None)


def test_the_mask_can_be_switched_off_and_on(detectors):
    _, masked = detectors
    x = torch.rand(1, 3, SIZE, SIZE)
    masked.set_anatomy_mask(None)
    assert masked.anatomy is None and masked.config["anatomy_mask"] is None
    masked.set_anatomy_mask({"method": "otsu"})
    assert masked.config["anatomy_mask"]["method"] == "otsu" and masked.anatomy_mask(x).shape == (1, 1, SIZE, SIZE)
    masked.set_anatomy_mask(True)
    assert masked.config["anatomy_mask"]["method"] == "nonzero"


def test_a_ct_whose_window_leaves_soft_tissue_black_keeps_the_chest_inside_its_ring_of_bone():
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    r = ((yy - 64) ** 2 / 40**2 + (xx - 64) ** 2 / 50**2).sqrt()
    img = torch.where((r > 0.93) & (r < 1.0), torch.ones(()), torch.zeros(()))  # thin ribs, black tissue and lungs
    img[(yy - 60) ** 2 + (xx - 40) ** 2 <= 9] = 0.5  # a small nodule in the lung
    mask = AnatomyMaskLayer(**anatomy_mask_config(True, "ct_lung"))(img[None, None].repeat(1, 3, 1, 1))[0, 0] > 0
    assert mask[r < 0.9].float().mean() > 0.97 and mask[r > 1.1].float().mean() < 0.02
