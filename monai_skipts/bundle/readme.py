"""The text files of an exported bundle: ``docs/README.md`` (:func:`bundle_readme`) and ``LICENSE``
(:func:`license_text`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["bundle_readme", "license_text"]


def bundle_readme(meta: Mapping[str, Any], name: str) -> str:
    sk = meta["monai_skipts"]
    thr = meta.get("anomaly_threshold") or {}
    s = sk["spatial_size"]
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in meta.get("eval_metrics", {}).items()) or "not recorded"
    pkgs = " ".join(f'"{k}=={v}"' for k, v in meta["required_packages_version"].items())
    return f"""# {meta["name"]}

{meta["description"]}

Task: {meta["task"]}. Intended use: {meta["intended_use"]}

## Model

Skip-TS teacher-student anomaly detector (Liu et al., IEEE TIM 2024) trained on normal images only;
teacher `{sk["teacher"]}`, input {s[0]}x{s[1]}, modality preset `{sk["modality"]}`. Training data:
{meta.get("data_source", "not recorded")}. Test metrics of the training run: {metrics}.

- `models/model.pt`: the `monai_skipts.networks.AnomalyDetector` checkpoint: its config, and its state
  (teacher and student weights, per-level statistics, thresholds) under `state_dict` and, for MONAI
  Label, `model` (the state dict of `network_def`); `models/model.ts`: TorchScript of the same network
  (outputs: the map and the score). Both are checked against the SHA-256 recorded in
  `configs/metadata.json` (`model_files_sha256`) before the bundle scores anything.
- Network input `image`: `(B, 3, {s[0]}, {s[1]})` float32, preprocessed by `preprocessing` (intensity to
  [0, 1] for the `{sk["modality"]}` preset, resize, 3 channels, ImageNet normalisation).
- Network output `pred`: the anomaly map `(B, 1, {s[0]}, {s[1]})`. The image score is its maximum; an
  image is anomalous when `score >= {thr.get("value")}` (threshold calibrated on held-out normals at a
  false-positive rate of {thr.get("target_fpr")}; `configs/metadata.json` `anomaly_threshold`).

## Install and run

```bash
pip install {pkgs}
python -m monai.bundle run --config_file {name}/configs/inference.json --input /path/to/images
```

`--input` takes a folder (every PNG/JPG/DICOM/NIfTI/NRRD below it), a file, or a list; volumes are
scored slice by slice. The run is monai-skipts' own inference (`python -m monai_skipts.inference`), so
its outputs under `--output_dir` (default `{name}/eval`) are the same: `predictions.csv` (header: id,
score, threshold, anomalous, normalized_score, volume_id, slice_index, map; ids relative to the input),
`volume_predictions.csv` for volumes, `errors.csv` (file, reason: the inputs that could not be scored),
`status.json`, and the anomaly maps under `maps/` (`<id>.map.png` for a picture, `<id>.map.nii.gz` for a
volume; `--save_maps False` to skip). An input that cannot be scored does not stop the others: it is
listed in `errors.csv` and the run exits 1 with one line (`--fail_fast True` stops at the first). Other
overrides: `--batch_size`, `--device`, `--volume_axis`, `--volume_aggregation`, `--max_pixels`,
`--progress on|off|auto`.
The bundle finds its models from any working directory; `--bundle_root` overrides.

MONAI Label serves the unzipped folder with `monailabel.tasks.infer.bundle.BundleInferTask`; the
request's result holds `score`, `threshold`, `anomalous` and `normalized_score`.

## License

Code and model: Apache-2.0 (`LICENSE`). The training data keep their sources' own licences. Not a
diagnostic device.
"""


def license_text() -> str:
    head = (
        "monai-skipts bundle: code and model weights are licensed under the Apache License, Version 2.0\n"
        "(SPDX-License-Identifier: Apache-2.0). The teacher's ImageNet weights are Apache-2.0 as published.\n"
        "Training data keep the licences of their sources.\n\n"
    )
    from importlib import metadata

    try:  # the licence's full text, as MONAI ships it (MONAI is Apache-2.0 too)
        for f in metadata.distribution("monai").files or []:
            if f.name.upper().startswith("LICENSE"):
                text = Path(f.locate()).read_text(encoding="utf-8")
                if "Apache License" in text:
                    return head + text
    except Exception:  # noqa: BLE001 - the short form below is still a valid licence statement
        pass
    return head + "Full text: https://www.apache.org/licenses/LICENSE-2.0\n"
