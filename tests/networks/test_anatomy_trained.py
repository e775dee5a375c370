"""A trained detector (phantom, the offline teacher, a few epochs, level statistics inside the anatomy)
and a bold caption burned in outside the anatomy: with the anatomy mask the score moves by a small
share of the distance to the threshold; without it the same caption moves it past the threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from PIL import Image, ImageDraw, ImageFont

from monai_skipts.apps import make_phantom_dataset
from monai_skipts.calibration import threshold_record
from monai_skipts.data import prepare_split
from monai_skipts.engines import LevelStatsFitter, SkipTSTrainer, TeacherFeatureCache
from monai_skipts.networks import AnomalyDetector, SkipTS
from monai_skipts.transforms import preset_transforms

SIZE = 64
#: top-left corners of the caption tried in turn (the image's four corners)
CORNERS = ((1, 1), (SIZE - 14, SIZE - 11), (SIZE - 14, 1), (1, SIZE - 11))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Skip-TS (skip connections, DRKD loss) trained 20 epochs on 16 phantom normals, its level statistics
    fitted inside the anatomy; 12 held-out normals to calibrate on and 12 to burn captions into."""
    torch.manual_seed(0)
    root = make_phantom_dataset(
        tmp_path_factory.mktemp("phantom"), n_train=16, n_test_normal=24, n_test_abnormal=1, size=SIZE, seed=0
    )
    split = prepare_split("mvtec", root, seed=0, val_fraction=0.0)
    transform = Compose(preset_transforms("mri", SIZE, keys="image"))
    loader = DataLoader(Dataset(split["train"], transform), batch_size=8, shuffle=True)
    net = SkipTS("efficientnet_lite0")
    det = AnomalyDetector(net, preprocessing={"modality": "mri", "spatial_size": SIZE}, anatomy_mask=True)
    cache = TeacherFeatureCache(net, transform)
    SkipTSTrainer("cpu", 20, loader, net, prepare_batch=cache, amp=False).run()
    LevelStatsFitter(det, loader, prepare_batch=cache)()
    normals = torch.stack([transform(dict(it))["image"].as_tensor() for it in split["test"] if it["label"] == 0])
    return det.eval(), normals[:12], normals[12:]


def _caption(img: torch.Tensor, corner: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``img`` with a bold caption (PIL's font, stroke 1) at ``corner`` in its brightest value, and its mask."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    font = ImageFont.load_default()
    ImageDraw.Draw(canvas).text((corner[0], corner[1] - 2), "R3", fill=255, font=font, stroke_width=1, stroke_fill=255)
    drawn = torch.as_tensor(np.asarray(canvas) == 255)  # the glyphs without their anti-aliased rim
    out = img.clone()
    out[:, drawn] = img.max()
    return out, drawn


def _shares(det: AnomalyDetector, calib: torch.Tensor, clean: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """Score shift of each marked image as a share of its clean score's distance to the threshold
    (calibrated on ``calib``: target FPR 5 %, lognormal), for the clean images below the threshold."""
    with torch.no_grad():
        det.set_calibration(threshold_record(det(calib)[1].numpy(), 0.05, "lognormal"))
        s0, s1 = det(clean)[1].double(), det(marked)[1].double()
    threshold = float(det.threshold)
    below = s0 < threshold
    assert int(below.sum()) >= 8
    return ((s1 - s0) / (threshold - s0))[below]


def test_a_caption_outside_the_anatomy_barely_moves_the_score_and_would_without_the_mask(trained):
    """Measured (median share of the distance to the threshold): 0.18 with the mask, 3.3 without.
    With the bundles' default architecture (one-class bottleneck, no skip connections) the same caption
    moves the score about as much with the mask as without (median 0.7 vs 1.9 at 20 epochs): through
    the global bottleneck code it changes the features inside the anatomy, which no mask removes."""
    det, calib, held = trained
    with torch.no_grad():
        near = F.max_pool2d(det.anatomy_mask(held), 5, 1, 2)[:, 0] > 0  # the anatomy and 2 px around it
    pairs = []
    for img, body in zip(held, near):  # the first corner where the caption keeps 2 px off the anatomy
        pairs.append(next(p for p in (_caption(img, c) for c in CORNERS) if not bool((p[1] & body).any())))
    marked, drawn = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    with torch.no_grad():
        assert not bool(((det.anatomy_mask(marked)[:, 0] > 0) & drawn).any())  # the mask drops the caption

    masked = _shares(det, calib, held, marked)
    det.set_anatomy_mask(None)
    try:
        plain = _shares(det, calib, held, marked)
    finally:
        det.set_anatomy_mask(True)
    assert float(masked.median()) < 0.35, masked.tolist()
    assert float(plain.median()) > 1.0 and float(plain.median()) > 4 * float(masked.median()), plain.tolist()
