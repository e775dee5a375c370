"""TiledResize(d): MONAI's Resize(d) bit for bit, with the anti-aliasing convolutions on a bounded set of shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, GaussianSmooth, Resize, Resized
from PIL import Image

from monai_skipts.transforms import preset_transforms
from monai_skipts.transforms.spatial import TiledResize, TiledResized, tiled_gaussian_smooth


def _image(shape, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 255
    return MetaTensor(x.round() if integer else x, affine=torch.diag(torch.tensor([0.7, 1.3, 1.0, 1.0])))


def _assert_same(a, b):
    assert torch.equal(a.as_tensor(), b.as_tensor()), float((a.as_tensor() - b.as_tensor()).abs().max())
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.affine, b.affine)
    ta, tb = a.applied_operations[-1], b.applied_operations[-1]
    assert (ta["orig_size"], ta["extra_info"]) == (tb["orig_size"], tb["extra_info"])


@pytest.mark.parametrize(
    "shape, size",
    [
        ((3, 701, 533), (256, 256)),  # RGB, odd sides, down
        ((1, 1023, 517), (256, 256)),  # grey, down
        ((1, 999, 301), (127, 300)),  # grey, down one axis, up the other
        ((3, 263, 389), (600, 777)),  # up only: MONAI does not smooth
        ((3, 300, 260), (256, 256)),  # smaller than two tiles on one axis
        ((1, 120, 90), (32, 32)),  # fewer pixels than one tile: MONAI's own computation
        ((1, 67, 71, 59), (32, 32, 32)),  # 3-D, grey
        ((2, 131, 70, 65), (40, 80, 20)),  # 3-D, two channels, down and up
    ],
)
@pytest.mark.parametrize("sigma", [None, 1.7])
def test_tiled_resize_equals_monai_resize_bit_for_bit(shape, size, sigma):
    img = _image(shape, seed=sum(shape), integer=shape[0] == 1)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    ours = TiledResize(size, mode=mode, anti_aliasing=True, anti_aliasing_sigma=sigma)(img)
    theirs = Resize(size, mode=mode, anti_aliasing=True, anti_aliasing_sigma=sigma)(img)
    _assert_same(ours, theirs)
    assert ours.applied_operations[-1]["class"] == "TiledResize"


@pytest.mark.parametrize("tile", [64, 100, 257])
@pytest.mark.parametrize("channels", [1, 3])
def test_tile_side_does_not_change_the_result(tile, channels):
    # single-channel tiles under MIN_TILE_SAMPLES would run on PyTorch's other convolution path: enlarged
    img = _image((channels, 611, 487), seed=1)
    theirs = Resize((256, 200), mode="bilinear", anti_aliasing=True)(img)
    _assert_same(TiledResize((256, 200), mode="bilinear", anti_aliasing=True, tile=tile)(img), theirs)


def test_other_arguments_and_inputs_follow_monai():
    img = _image((3, 540, 610), seed=2)
    for kwargs in (
        {"spatial_size": 256, "size_mode": "longest", "mode": "area", "anti_aliasing": True},
        {"spatial_size": (200, -1), "mode": "bicubic", "align_corners": True, "anti_aliasing": True},
        {"spatial_size": (200, 300), "mode": "bilinear", "anti_aliasing": True, "dtype": torch.float64},
        {"spatial_size": (200, 300), "mode": "bilinear"},  # no anti-aliasing
        {"spatial_size": (200, 300), "mode": "nearest", "anti_aliasing": True},
    ):
        _assert_same(TiledResize(**kwargs)(img), Resize(**kwargs)(img))
    arr = img.numpy()  # a numpy array in, as Resize takes it
    ours = TiledResize((256, 256), mode="bilinear", anti_aliasing=True)(arr)
    assert torch.equal(ours.as_tensor(), Resize((256, 256), mode="bilinear", anti_aliasing=True)(arr).as_tensor())
    # call-time arguments override the constructor's, as in Resize
    call = {"mode": "area", "anti_aliasing": True, "anti_aliasing_sigma": 3.0}
    _assert_same(TiledResize((128, 128))(img, **call), Resize((128, 128))(img, **call))
    with pytest.raises(ValueError):
        TiledResize((16, 16), tile=0)


def test_inverse_restores_the_original_size_like_resize():
    img = _image((1, 700, 650), seed=3)
    ours = TiledResize((64, 64), mode="bilinear", anti_aliasing=True)
    theirs = Resize((64, 64), mode="bilinear", anti_aliasing=True)
    back, expected = ours.inverse(ours(img)), theirs.inverse(theirs(img))
    assert back.shape == img.shape and not back.applied_operations
    assert torch.equal(back.as_tensor(), expected.as_tensor())


def test_tiled_gaussian_smooth_equals_gaussian_smooth():
    img = torch.rand(3, 517, 601)
    for sigma in ([2.0, 0.0], [0.6, 5.5]):
        expected = GaussianSmooth(sigma=sigma)(img)
        assert torch.equal(tiled_gaussian_smooth(img, sigma), expected)
        assert torch.equal(tiled_gaussian_smooth(img, sigma, tile=97), expected)
    with pytest.raises(ValueError):
        tiled_gaussian_smooth(img, [1.0])


def test_tiled_resized_equals_resized_on_an_image_and_its_mask():
    data = {"image": _image((3, 733, 651), seed=4), "mask": MetaTensor((torch.rand(1, 733, 651) > 0.9).float())}
    kwargs = {"mode": ("bilinear", "nearest"), "anti_aliasing": (True, False)}
    ours = TiledResized(("image", "mask"), (256, 256), **kwargs)
    theirs = Resized(("image", "mask"), (256, 256), **kwargs)
    out, ref = ours(data), theirs(data)
    for key in ("image", "mask"):
        _assert_same(out[key], ref[key])
    back = ours.inverse(out)
    assert back["image"].shape == data["image"].shape and back["mask"].shape == data["mask"].shape
    assert TiledResized("image", (8, 8), allow_missing_keys=True)({"other": 1}) == {"other": 1}


def _convolution_shapes(capfd, run) -> set[str]:
    """The distinct convolution problems (input, kernel and output shapes) oneDNN creates or fetches from
    its primitive cache while ``run()`` runs: one compiled primitive, kept for the process, per entry."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        run()
    lines = capfd.readouterr().out.splitlines()
    return {line.split(",")[-2] for line in lines if ",create:" in line and ",convolution," in line}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN CPU backend")
def test_presets_resize_a_set_of_sizes_with_a_bounded_set_of_convolution_shapes(tmp_path, capfd):
    # 12 RGB JPEGs, every one a different size: MONAI's Resized convolves each whole image, two new
    # convolution shapes (two oneDNN primitives kept for good) per image; the presets' resize must use a
    # fixed few (here two kernel lengths per axis: at most 4)
    rng = np.random.default_rng(0)
    files = []
    for k in range(12):
        h, w = 560 + 11 * k, 700 - 9 * k
        path = tmp_path / f"{k}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    chain = Compose(preset_transforms("rgb", 256))

    def preprocess():
        for f in files:
            assert chain({"image": f})["image"].shape == (3, 256, 256)

    shapes = _convolution_shapes(capfd, preprocess)
    monai_resize = Resized("image", (256, 256), mode="bilinear", anti_aliasing=True)
    monai_chain = Compose([monai_resize if isinstance(t, Resized) else t for t in preset_transforms("rgb", 256)])
    monai_shapes = _convolution_shapes(capfd, lambda: [monai_chain({"image": f}) for f in files])
    assert len(monai_shapes) >= 2 * len(files)  # the measurement sees the cause
    assert 0 < len(shapes) <= 4, sorted(shapes)
    out = chain({"image": files[0]})["image"]
    assert torch.equal(out.as_tensor(), monai_chain({"image": files[0]})["image"].as_tensor())
