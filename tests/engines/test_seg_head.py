"""The segmentation head's training stage: real synthetic lesions on a phantom, the real offline teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import run_doctests
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from sklearn.metrics import roc_auc_score

from monai_skipts.apps import make_phantom_dataset
from monai_skipts.data import prepare_split
from monai_skipts.engines import (
    SEG_HEAD_DEFAULTS,
    LevelStatsFitter,
    SegHeadLoss,
    SegHeadTrainer,
    SkipTSTrainer,
    TeacherFeatureCache,
    seg_head_options,
)
from monai_skipts.engines import seg_head as seg_head_module
from monai_skipts.losses import build_loss
from monai_skipts.networks import AnomalyDetector, SkipTS
from monai_skipts.transforms import RandSyntheticLesion, preset_transforms

SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A phantom, a student trained briefly (the default architecture), its level statistics, and the
    held-out test normals with synthetic lesions of another seed (and their masks)."""
    torch.manual_seed(0)
    root = make_phantom_dataset(
        tmp_path_factory.mktemp("phantom"), n_train=16, n_test_normal=8, n_test_abnormal=8, size=SIZE, seed=0
    )
    split = prepare_split("mvtec", root, seed=0, val_fraction=0.0)
    transform = Compose(preset_transforms("mri", SIZE, keys="image"))
    loader = DataLoader(Dataset(split["train"], transform), batch_size=8, shuffle=False)
    net = SkipTS("efficientnet_lite0", skip="none", bottleneck=True)
    det = AnomalyDetector(net, preprocessing={"modality": "mri", "spatial_size": SIZE})
    cache = TeacherFeatureCache(net, transform)
    SkipTSTrainer("cpu", 3, loader, net, loss_function=build_loss("rd4ad"), prepare_batch=cache, amp=False).run()
    LevelStatsFitter(det, loader, prepare_batch=cache)()
    lesion = RandSyntheticLesion(prob=1.0)
    lesion.set_random_state(123)
    normals = [transform(dict(it))["image"].as_tensor() for it in split["test"] if it["label"] == 0]
    pairs = [lesion(im, source=normals[(i + 1) % len(normals)]) for i, im in enumerate(normals)]
    x, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return det, loader, cache, x, masks


def _pixel_auroc(det, x, masks):
    with torch.no_grad():
        amap, _ = det.eval()(x)
    return roc_auc_score(masks.flatten().numpy() > 0, amap.flatten().numpy())


def test_head_trained_on_synthetic_lesions_localises_held_out_ones_better_than_the_discrepancy(trained):
    """Teacher and student frozen, the head learns from lesions of one seed and finds those of another
    on unseen normals: pixel AUROC measured 0.93 (the discrepancy map of this briefly trained student:
    0.60); its loss falls."""
    det, loader, cache, x, masks = trained
    assert bool((masks > 0).any()) and float(masks.mean()) < 0.2
    student = {k: v.clone() for k, v in det.model.state_dict().items()}
    base = _pixel_auroc(det, x, masks)
    stage = SegHeadTrainer(det, loader, {"mode": "map", "epochs": 60, "loss": "bce_dice"}, cache, seed=0)
    head = stage()
    assert det.seg_head is head and det.config["seg_head"]["mode"] == "map"
    assert all(torch.equal(v, det.model.state_dict()[k]) for k, v in student.items())  # frozen
    assert sum(stage.losses[-10:]) < sum(stage.losses[:10])
    auroc = _pixel_auroc(det, x, masks)
    assert auroc > 0.8 and auroc > base + 0.1, (auroc, base)
    offset, scale = det.seg_head.map_norm.tolist()  # the fused normalisation, fitted on the clean normals
    assert scale > 0 and (offset, scale) != (0.0, 1.0)
    det.set_seg_head_mode("fused")
    assert _pixel_auroc(det, x, masks) > base
    det.set_seg_head_mode("discrepancy")
    assert _pixel_auroc(det, x, masks) == base


def test_fused_normalisation_is_fitted_on_the_served_map_inside_the_anatomy(trained):
    """With the anatomy mask on, the ``"fused"`` offset is the mean discrepancy pixel inside the anatomy
    of the clean training normals, not a mean diluted by the zeros outside it."""
    det, loader, cache, _, _ = trained
    masked = AnomalyDetector(det.model, preprocessing=det.config["preprocessing"], anatomy_mask=True)
    LevelStatsFitter(masked, loader, prepare_batch=cache)()
    SegHeadTrainer(masked, loader, {"mode": "fused", "epochs": 1}, cache, seed=0)()
    inside, everywhere = [], []
    masked.eval()
    with torch.no_grad():
        for batch in loader:
            x, _, _, kwargs = cache(batch, torch.device("cpu"))
            t, s = masked.model(x, kwargs["teacher_feats"])
            mask = masked.anatomy_mask(x)
            amap, _ = masked.head(t, s, x.shape[-2:], masked.get_level_stats(), mask)
            inside.append(amap[mask.expand_as(amap) > 0])
            everywhere.append(amap.flatten())
    offset = float(masked.seg_head.map_norm[0])
    assert offset == pytest.approx(float(torch.cat(inside).double().mean()), rel=1e-5)
    assert abs(float(torch.cat(everywhere).double().mean())) < 0.8 * abs(offset)  # the background: a large share


def test_focal_l1_loss_trains_the_head_too(trained):
    """DeSTSeg's loss (focal, gamma 4, + L1), the stage's default: measured pixel AUROC 0.88."""
    det, loader, cache, x, masks = trained
    SegHeadTrainer(det, loader, {"mode": "map", "epochs": 60}, cache, seed=0)()
    assert _pixel_auroc(det, x, masks) > 0.75


def test_stage_is_off_without_options_and_refuses_bad_ones(trained):
    det, loader, cache, _, _ = trained
    before = det.config["seg_head"]
    assert SegHeadTrainer(det, loader, None, cache)() is None and det.config["seg_head"] == before
    with pytest.raises(ValueError, match="unknown options"):
        SegHeadTrainer(det, loader, {"epoch": 2})
    with pytest.raises(ValueError, match="'map' or 'fused'"):
        SegHeadTrainer(det, loader, {"mode": "discrepancy"})
    with pytest.raises(ValueError, match="seg_head loss must be one of"):
        SegHeadTrainer(det, loader, {"loss": "mse"})
    with pytest.raises(ValueError, match="seg_head epochs must be an integer >= 1, got 0"):
        SegHeadTrainer(det, loader, {"epochs": 0})
    with pytest.raises(ValueError, match="seg head loss"):
        SegHeadLoss("dice")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epoch": 2}, r"seg_head: unknown options \['epoch'\]; did you mean 'epochs'\?"),
        ({"mode": "discrepancy"}, "seg_head mode must be 'map' or 'fused', got 'discrepancy'"),
        ({"epochs": 0}, "seg_head epochs must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "seg_head epochs must be an integer >= 1, got 2.5"),
        ({"loss": "mse"}, r"seg_head loss must be one of \['focal_l1', 'bce_dice'\], got 'mse'"),
        ("map", "seg_head must be null \\(off\\) or a mapping"),
    ],
)
def test_options_are_checked_by_name(options, message):
    """The one check of ``seg_head`` (the stage's and the bundle's, before training) names the option."""
    with pytest.raises(ValueError, match=message):
        seg_head_options(options)
    assert seg_head_options(None) is None
    assert seg_head_options({"mode": "fused", "epochs": 2}) == {**SEG_HEAD_DEFAULTS, "mode": "fused", "epochs": 2}


def test_doctests():
    run_doctests(seg_head_module)
