"""Skip-connection variants of the student (ours: skip_levels, skip_dropout, skip_noise, "gate") and the
EfficientNet-Lite "expanded" teacher taps; their defaults must stay the paper's model."""

from __future__ import annotations

import pytest
import torch

from monai_skipts.checkpoint import load_checkpoint, load_detector, save_checkpoint
from monai_skipts.networks import (
    SKIP_MODES,
    AnomalyDetector,
    SkipStudent,
    SkipTS,
    build_teacher,
    feature_shapes,
    student_preset,
    teacher_weights_available,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CH = (8, 16, 32, 64)


def _feats(seed: int = 0, size: int = 16, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size // 2**i, size // 2**i, generator=g) for i, c in enumerate(CH)]


def _student(seed: int = 0, **kw) -> SkipStudent:
    torch.manual_seed(seed)
    return SkipStudent(CH, **kw)


def _run(st: SkipStudent, t, train: bool = False, seed: int = 0) -> list[torch.Tensor]:
    st.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        return st(t)


@pytest.mark.parametrize("skip", SKIP_MODES)
@pytest.mark.parametrize("levels", [(3, 2), (3,), (2,), ()])
def test_shapes_for_each_variant(skip, levels):
    st = _student(skip=skip, skip_levels=levels, skip_dropout=0.3, skip_noise=0.5)
    t = _feats()
    for train in (True, False):
        assert [o.shape for o in _run(st, t, train)] == [f.shape for f in t[:3]]
    assert st.skip_levels == (() if skip == "none" else tuple(v for v in (3, 2) if v in levels))


def test_invalid_options_are_refused():
    for kw in (
        {"skip_levels": (1,)},
        {"skip_levels": (3, 3)},
        {"skip_dropout": 1.0},
        {"skip_dropout": -0.1},
        {"skip_noise": -1.0},
        {"skip": "mul"},
    ):
        with pytest.raises(ValueError):
            SkipStudent(CH, **kw)


def test_new_options_leave_the_decoders_initial_weights_unchanged():
    ref = _student().state_dict()
    for kw in ({"skip_dropout": 0.5, "skip_noise": 1.0}, {"skip_levels": (3,)}, {"skip": "gate"}):
        sd = _student(**kw).state_dict()
        extra = set(sd) - set(ref)
        assert extra == ({"skip_gate.level3", "skip_gate.level2"} if kw.get("skip") == "gate" else set())
        assert all(torch.equal(ref[k], sd[k]) for k in ref)


@pytest.mark.parametrize("kw", [{"skip_dropout": 0.5}, {"skip_noise": 1.0}, {"skip_dropout": 0.5, "skip_noise": 1.0}])
def test_dropout_and_noise_act_in_training_only(kw):
    t = _feats()
    plain, noisy = _student(), _student(**kw)
    # eval: deterministic and equal to the paper's add
    a, b, c = _run(plain, t), _run(noisy, t, seed=1), _run(noisy, t, seed=2)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    # training: the teacher part is perturbed (D3 sees no skip, so F_s^3 is unchanged)
    a, b = _run(plain, t, train=True), _run(noisy, t, train=True)
    assert torch.equal(a[2], b[2]) and not torch.allclose(a[1], b[1]) and not torch.allclose(a[0], b[0])


def test_zero_dropout_and_noise_are_the_plain_add_in_training_too():
    t = _feats()
    a, b = _run(_student(), t, train=True), _run(_student(skip_dropout=0.0, skip_noise=0.0), t, train=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_skip_dropout_drops_whole_channels_and_rescales():
    st = _student(skip_dropout=0.5).train()
    f = torch.randn(4, 32, 8, 8)
    torch.manual_seed(0)
    out = st._teacher_part(f)
    kept = (out != 0).flatten(2).any(-1)  # (B, C)
    assert 0 < kept.float().mean() < 1
    assert torch.allclose(out[kept], 2 * f[kept]) and (out[~kept] == 0).all()


def test_skip_noise_scales_with_each_channels_spread_and_is_not_backpropagated():
    st = _student(skip_noise=0.5).train()
    scale = torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    f = (torch.randn(2, 3, 64, 64) * scale).requires_grad_(True)
    torch.manual_seed(0)
    out = st._teacher_part(f)
    spread = (out - f).detach().std(dim=(-2, -1)) / f.detach().std(dim=(-2, -1), unbiased=False)
    assert torch.allclose(spread, torch.full_like(spread, 0.5), rtol=0.05)
    out.sum().backward()
    assert torch.equal(f.grad, torch.ones_like(f))
    assert torch.equal(st.eval()._teacher_part(f), f)


def test_skip_levels_cut_the_teacher_feature_they_leave_out():
    t = _feats()
    t2_changed = [t[0], t[1] + 1.0, t[2], t[3]]  # only F_t^2 (the skip into D1) changes
    t3_changed = [t[0], t[1], t[2] + 1.0, t[3]]  # only F_t^3 (the skip into D2) changes
    for levels, d1_sees_t2, d2_sees_t3 in (
        ((3, 2), True, True),
        ((3,), False, True),
        ((2,), True, False),
        ((), False, False),
    ):
        st = _student(skip_levels=levels)
        a, b, c = _run(st, t), _run(st, t2_changed), _run(st, t3_changed)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])  # F_t^2 reaches D1 only
        assert torch.equal(a[0], b[0]) != d1_sees_t2
        assert torch.equal(a[1], c[1]) != d2_sees_t3
    # skip="none" is skip_levels=()
    none, empty = _student(skip="none"), _student(skip_levels=())
    assert all(torch.equal(x, y) for x, y in zip(_run(none, t), _run(empty, t)))


def test_gate_starts_at_half_the_teacher_feature_and_learns():
    t = _feats()
    gate, add = _student(skip="gate"), _student()
    assert all(torch.equal(p, torch.zeros_like(p)) for p in gate.skip_gate.values())
    assert gate.skip_gate["level3"].shape == (CH[2],) and gate.skip_gate["level2"].shape == (CH[1],)
    halved = [t[0], 0.5 * t[1], 0.5 * t[2], t[3]]
    assert all(torch.equal(x, y) for x, y in zip(_run(gate, t), _run(add, halved)))
    gate.train()
    sum(o.sum() for o in gate(t)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.skip_gate.values())
    # a gate only for the levels that have a skip
    assert set(_student(skip="gate", skip_levels=(2,)).skip_gate) == {"level2"}


def test_defaults_are_the_paper_model():
    """Default options: the same initial student (per seed), config and outputs as the explicit paper options."""
    torch.manual_seed(0)
    default = SkipTS("resnet18", pretrained=False)
    torch.manual_seed(0)
    explicit = SkipTS(
        "resnet18",
        pretrained=False,
        skip="add",
        skip_levels=(3, 2),
        skip_dropout=0.0,
        skip_noise=0.0,
        teacher_taps="layer",
    )
    a, b = default.student.state_dict(), explicit.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert default.config == explicit.config
    assert default.config["skip_levels"] == [3, 2] and default.config["teacher_taps"] == "layer"
    assert default.config["skip_dropout"] == 0.0 and default.config["skip_noise"] == 0.0


# --------------------------------------------------------------------------- teacher taps


@pytest.fixture(scope="module")
def lite_pair():
    """Random-weight Lite0 teachers with both tap kinds and the same weights."""
    project = build_teacher("efficientnet_lite0", pretrained=False)
    expanded = build_teacher("efficientnet_lite0", pretrained=False, taps="expanded")
    expanded.load_state_dict(project.state_dict())
    return project, expanded


def test_expanded_taps_of_lite0(lite_pair):
    project, expanded = lite_pair
    assert project.tap_kind == "project" and project.out_channels == (24, 40, 112, 320) and not project.nonnegative
    assert expanded.tap_kind == "expanded" and expanded.out_channels == (144, 240, 672, 1152) and expanded.nonnegative
    assert project.state_dict().keys() == expanded.state_dict().keys()  # the same weights file loads into both
    shapes = feature_shapes(expanded, 64)
    assert shapes == [(144, 16, 16), (240, 8, 8), (672, 4, 4), (1152, 2, 2)]
    # the taps are the depthwise outputs after BN and ReLU6 of the blocks project taps, run as the package does
    caught = []
    for i in project.taps:
        block = project.blocks[i]
        block._bn1.register_forward_hook(lambda m, inp, out, b=block: caught.append(b._swish(out)))
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        e_project, e_expanded = project(x), expanded(x)
    for block in project.blocks:
        block._bn1._forward_hooks.clear()
    assert len(caught) == 4 and all(torch.equal(a, b) for a, b in zip(caught, e_expanded))
    assert all((f >= 0).all() for f in e_expanded) and any((f < 0).any() for f in e_project)


def test_student_over_expanded_taps(lite_pair):
    _, expanded = lite_pair
    preset = student_preset(expanded)
    assert preset["widths"] == (672, 240, 144) and preset["up_widths"] == (1152, 672, 240)  # expansion 1
    model = SkipTS(expanded, skip="gate", skip_levels=(3,))
    assert model.config["teacher_taps"] == "expanded"
    t, s = model(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in s] == [f.shape for f in t]
    assert all((f >= 0).all() for f in s)  # non-negative taps: the student ends its stages with a ReLU
    enc = SkipTS("efficientnet_lite0", pretrained=False, student="encoder", teacher_taps="expanded")
    t, s = enc(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in s] == [f.shape for f in t]


def test_tap_kind_errors(lite_pair, offline_torch_home):
    with pytest.raises(ValueError, match="tap kind 'expanded'.*efficientnet_lite teachers only"):
        SkipTS("resnet18", pretrained=False, teacher_taps="expanded")
    with pytest.raises(ValueError, match="tap kind 'layer'"):
        build_teacher("efficientnet_lite0", pretrained=False, taps="layer")
    # refused before any weights are looked up (here there are none)
    with pytest.raises(ValueError, match="tap kind"):
        SkipTS("wide_resnet50_2", teacher_taps="expanded")
    with pytest.raises(ValueError, match="has 'expanded' taps"):
        SkipTS(lite_pair[1], teacher_taps="project")


# --------------------------------------------------------------------------- checkpoints

needs_lite0 = pytest.mark.skipif(
    not teacher_weights_available("efficientnet_lite0"), reason="efficientnet_lite0 weights package not installed"
)


def _predictions(model: SkipTS, x: torch.Tensor):
    with torch.no_grad():
        t, s = model.eval()(x)
        amap, score = AnomalyDetector(model)(x)
    return s, amap, score


@needs_lite0
def test_checkpoint_round_trip_of_the_new_options(tmp_path):
    torch.manual_seed(0)
    model = SkipTS(
        "efficientnet_lite0", skip="gate", skip_levels=(3,), skip_dropout=0.3, skip_noise=0.5, teacher_taps="expanded"
    )
    with torch.no_grad():
        for p in model.student.skip_gate.values():
            p.normal_()
    path = save_checkpoint(tmp_path / "model.pt", AnomalyDetector(model))
    ckpt = load_checkpoint(path)
    loaded = load_detector(path).model
    assert loaded.config == model.config
    cfg = ckpt["config"]["model"]
    assert cfg["teacher_taps"] == "expanded" and cfg["skip_levels"] == [3]
    assert loaded.teacher.tap_kind == "expanded" and loaded.student.skip_dropout == 0.3
    assert loaded.student.skip_noise == 0.5 and loaded.student.skip_levels == (3,)
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(_predictions(model, x), _predictions(loaded, x)):
        a, b = (a, b) if isinstance(a, list) else ([a], [b])
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # a student trained on expanded taps never fits the projected taps of the same teacher weights
    project = SkipTS("efficientnet_lite0")
    assert project.teacher.weights_sha256 == loaded.teacher.weights_sha256
    with pytest.raises(RuntimeError, match="size mismatch"):
        project.student.load_state_dict(
            {k[len("model.student.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.student.")}
        )


@needs_lite0
def test_checkpoint_without_the_new_keys_loads_as_before(tmp_path):
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "model.pt", AnomalyDetector(model)))
    for key in ("skip_levels", "skip_dropout", "skip_noise", "teacher_taps"):
        del ckpt["config"]["model"][key]
    loaded = load_detector(ckpt).model
    assert loaded.config == model.config and loaded.teacher.tap_kind == "project"
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(_predictions(model, x)[1:], _predictions(loaded, x)[1:]):
        assert torch.equal(a, b)


def test_one_class_bottleneck_in_front_of_the_skip_decoder(tmp_path):
    """bottleneck=True: D3 gets RD4AD's fused E1-E3 code, not E4 (E4 no longer matters); with skips
    F_t^3 still reaches D2; with skip='none' the student is RD4AD's; checkpoints rebuild it."""
    from monai_skipts.networks import RD4AD

    torch.manual_seed(0)
    model = SkipTS("resnet18", pretrained=False, bottleneck=True).eval()
    x = torch.randn(2, 3, 64, 64)
    t = model.teacher_features(x)
    s = model.student_features(t)
    assert [f.shape for f in s] == [f.shape for f in t[:3]]
    t4 = [t[0], t[1], t[2], torch.randn_like(t[3])]
    assert all(torch.equal(a, b) for a, b in zip(s, model.student_features(t4)))  # E4 unused
    t3 = [t[0], t[1], t[2] + 1.0, t[3]]
    assert not torch.allclose(model.student_features(t3)[1], s[1])  # via the bottleneck and the skip
    assert model.config["bottleneck"] is True
    save_checkpoint(tmp_path / "m.pt", AnomalyDetector(model))
    torch.manual_seed(0)  # the random (pretrained=False) teacher is drawn first, as above
    again = load_detector(tmp_path / "m.pt")
    assert torch.equal(again(x)[0], AnomalyDetector(model)(x)[0])
    torch.manual_seed(0)
    rd = RD4AD("resnet18", pretrained=False)
    torch.manual_seed(0)
    same = SkipTS("resnet18", pretrained=False, bottleneck=True, skip="none")
    assert rd.student.state_dict().keys() == same.student.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(rd.student.state_dict().values(), same.student.state_dict().values()))
