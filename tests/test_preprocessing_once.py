"""The preprocessing is defined once. For real files (a PNG, a DICOM, a NIfTI slice)
every path gives the same tensor (``torch.equal``):

- training: the bundle's ``train.json`` (``%transforms/<preset>.json#preprocessing``, parsed with
  MONAI's ``ConfigParser``), its ``train#transforms``;
- evaluation: the bundle's ``evaluate.json`` (its ``eval_dataset#transform``, built from the checkpoint)
  and the batch :class:`~monai_skipts.engines.SkipTSEvaluator` hands its network;
- inference: :class:`~monai_skipts.inference.AnomalyPredictor` from the path (bundle inference) and
  from the loaded image;
- the MLflow pyfunc model (``serving_config`` -> ``load_context``);
- the export: the chain :func:`~monai_skipts.export.export_preprocessing` builds from a TorchScript
  export's embedded metadata;
- MONAI Label: the scorer of :class:`~monai_skipts.label.infer.SkipTSAnomalyInfer`'s pipeline
  (:class:`~monai_skipts.inference.AnomalyPredictor`), from its loader.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, save_test_checkpoint
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from PIL import Image

from monai_skipts.engines import SkipTSEvaluator
from monai_skipts.networks import SkipTS

SIZE = 64
#: file kind -> (bundle whose preset reads it, preset)
CASES = {"png": ("demo", "xray"), "dicom": ("headct", "ct_brain"), "nifti": ("brainmri", "mri")}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((50, 70)) * 255).astype(np.uint8)).save(root / "xray.png")
    ax = np.linspace(-1, 1, 48)
    blob = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) * 3)
    sl = (blob * 900 + rng.normal(0, 30, (48, 48)))[..., None].astype(np.float32)  # one axial slice (X, Y, 1)
    nib.save(nib.Nifti1Image(sl, np.diag([0.9, 0.9, 3.0, 1.0])), root / "slice.nii.gz")
    return {"png": root / "xray.png", "dicom": get_testdata_file("CT_small.dcm"), "nifti": root / "slice.nii.gz"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = SkipTS("efficientnet_lite0")
    out = {}
    for bundle, modality in CASES.values():
        out[modality] = save_test_checkpoint(
            root / f"{modality}.pt",
            model,
            threshold={"value": 1.0, "scale": 0.1},
            extra={"dataset": bundle, "modality": modality, "spatial_size": SIZE},
            with_rng=False,
        )
    return out


def _plain(x) -> torch.Tensor:
    return (x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)).float()


def _bundle_item(bundle: str, config: str, item_id: str, monkeypatch, **overrides):
    monkeypatch.chdir(REPO)  # the %transforms/... macros resolve against the working directory
    parser = ConfigParser()
    files = ["train.json"] + ([config] if config != "train.json" else [])  # evaluate/inference: overrides
    parser.read_config([str(REPO / "bundles" / bundle / f) for f in files])
    for k, v in {"spatial_size": SIZE, **overrides}.items():
        parser[k] = v
    return parser.get_parsed_content(item_id)


def _evaluator_input(transform, path: str) -> torch.Tensor:
    """The batch the evaluator's network gets (its prepare_batch), for one file."""
    ds = Dataset([{"image": path, "label": 0, "id": "x"}], transform)
    ev = SkipTSEvaluator("cpu", DataLoader(ds, batch_size=1), torch.nn.Identity())
    return ev.prepare_batch(next(iter(ev.data_loader)), torch.device("cpu"), False)[0][0]


@pytest.mark.parametrize("kind", list(CASES))
def test_every_path_gives_the_same_tensor(kind, files, checkpoints, tmp_path, monkeypatch):
    bundle, modality = CASES[kind]
    path, ckpt = str(files[kind]), str(checkpoints[modality])
    got: dict[str, torch.Tensor] = {}

    # training: bundles/<ds>/train.json as MONAI's ConfigParser builds it
    train = _bundle_item(bundle, "train.json", "train#transforms", monkeypatch)
    got["train bundle"] = _plain(train({"image": path})["image"])

    # evaluation: bundles/<ds>/evaluate.json (preset from the checkpoint), and the evaluator's batch
    evaluate = _bundle_item(
        bundle, "evaluate.json", "eval_dataset#transform", monkeypatch, checkpoint=ckpt, device_name="cpu"
    )
    got["evaluate bundle"] = _plain(evaluate({"image": path})["image"])
    got["SkipTSEvaluator batch"] = _plain(_evaluator_input(evaluate, path))

    # inference (bundle inference.json's AnomalyPredictor): from the path and from the loaded image
    from monai_skipts.inference import AnomalyPredictor

    predictor = AnomalyPredictor(ckpt, device="cpu")
    got["AnomalyPredictor (path)"] = predictor.model_input(path)
    got["AnomalyPredictor (loaded)"] = predictor.model_input(predictor.load(path))

    # MLflow pyfunc: the serving config log_and_register writes, loaded as MLflow does
    registry = pytest.importorskip("monai_skipts.registry")
    cfg = tmp_path / "serving_config.json"
    cfg.write_text(json.dumps(registry.serving_config(ckpt)))
    pyfunc = registry.SkipTSPyfuncModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": ckpt, registry.SERVING_CONFIG: str(cfg)}))
    got["MLflow pyfunc"] = pyfunc.scorer.model_input(pyfunc.scorer.load(path))

    # export: the chain rebuilt from a TorchScript export's embedded metadata
    from monai_skipts.export import export_checkpoint, export_preprocessing, load_torchscript

    ts = export_checkpoint(ckpt, tmp_path / "model.ts", fmt="torchscript", verify=False)
    _, meta, _ = load_torchscript(ts)
    got["export metadata"] = _plain(export_preprocessing(meta)({"image": path})["image"])

    # MONAI Label: the infer task's scorer (from --conf settings), from its loader
    from monai_skipts.label import scorer_from_conf

    scorer = scorer_from_conf({"checkpoint": ckpt, "device": "cpu"})
    got["MONAI Label scorer"] = scorer.model_input(scorer.load(path))

    want = got["train bundle"]
    assert want.shape == (3, SIZE, SIZE) and want.dtype == torch.float32 and bool(torch.isfinite(want).all())
    assert float(want.std()) > 0.1  # an image, not a constant
    differ = [name for name, t in got.items() if t.shape != want.shape or not torch.equal(t, want)]
    assert not differ, f"{kind}: these paths differ from the training bundle's tensor: {differ}"


def test_the_presets_are_one_python_call():
    """transforms/*.json wire one call of preset_transforms (no chain written out twice)."""
    from monai_skipts.transforms import PRESETS

    for name in PRESETS:
        frag = json.loads((REPO / "transforms" / f"{name}.json").read_text())["preprocessing"]
        assert frag["_target_"] == "monai_skipts.transforms.preset_transforms" and frag["modality"] == name
        assert frag["spatial_size"] == "@spatial_size"
