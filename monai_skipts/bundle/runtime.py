"""What an exported bundle's ``inference.json`` calls at inference: its root folder, the image score of a
map, MONAI's image layout for the writers, the names of the saved rows."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["running_bundle_root", "map_score", "ToMonaiLayoutd", "item_names"]


def running_bundle_root(default: str = ".") -> str:
    """The root folder of the bundle whose config MONAI is running: the parent of the ``configs``
    folder of the config file given to ``python -m monai.bundle run`` (or ``monai.bundle.run``,
    ``create_workflow``), found on the call stack's :class:`monai.bundle.ConfigWorkflow`.

    ``inference.json`` sets ``"bundle_root": "$monai_skipts.bundle.runtime.running_bundle_root()"``
    so that the bundle finds ``models/`` from any working directory without ``--bundle_root`` (MONAI's
    runner does not set it; MONAI Label and ``--bundle_root`` replace the expression). ``default``
    when no running workflow is found.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            root = getattr(obj, "config_root_path", None) if isinstance(obj, ConfigWorkflow) else None
            if root is not None:
                root = Path(root).absolute()
                return str(root.parent if root.name == "configs" else root)
            frame = frame.f_back
    finally:
        del frame
    return default


def map_score(amap: torch.Tensor) -> torch.Tensor:
    """Image score of one anomaly map ``(1, H, W)``: its maximum, as a float32 tensor of shape ``(1,)``
    (paper eq 8, as :class:`~monai_skipts.networks.AnomalyDetector` scores)."""
    t = amap.as_tensor() if hasattr(amap, "as_tensor") else torch.as_tensor(amap)
    return t.detach().float().amax().reshape(1)


class ToMonaiLayoutd:
    """Dictionary transform: 2-D images from this package's rows-first layout (``(C, rows, columns)``,
    as :class:`~monai_skipts.transforms.LoadMedicalImage` gives them) to MONAI's layout (``(C, x, y)``,
    as ``monai.transforms.LoadImage`` reads a PNG): swaps the last two axes of each key, with the
    ``spatial_shape`` and ``affine`` of its metadata, so MONAI's writers (``SaveImaged``, MONAI Label's
    ``Restored`` and writer) put the anomaly map over the input image, not transposed.

    Args:
        keys: the keys to swap (the bundle: ``["pred", "image"]``); missing keys are skipped.
    """

    def __init__(self, keys: str | Sequence[str]):
        self.keys = [keys] if isinstance(keys, str) else list(keys)

    @staticmethod
    def _swap(x: Any) -> Any:
        from monai.data import MetaTensor

        t = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x)
        if t.dim() < 3:
            return x
        y = t.transpose(-1, -2).contiguous()
        if not isinstance(x, MetaTensor):
            return y
        meta = dict(x.meta)
        shape = meta.get("spatial_shape")
        if shape is not None and len(shape) >= 2:
            shape = [int(v) for v in torch.as_tensor(shape).reshape(-1).tolist()]
            meta["spatial_shape"] = shape[:-2] + shape[-2:][::-1]
        aff = torch.as_tensor(x.affine).clone()
        k = t.dim() - 1  # spatial dimensions (channel first); MONAI keeps a 4x4 affine for 2-D images too
        if aff.dim() == 2 and aff.shape[-1] > k >= 2:  # swap the columns of the last two spatial axes
            aff[:, [k - 2, k - 1]] = aff[:, [k - 1, k - 2]]
        meta["affine"] = aff
        return MetaTensor(y, meta=meta)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d:
                d[key] = self._swap(d[key])
        return d


def item_names(batch: Sequence[Mapping[str, Any]], key: str = "image") -> list[dict[str, str]]:
    """``[{"filename_or_obj": name}]`` per item of a decollated batch, for MONAI's
    ``ClassificationSaver``: the input file, with ``#slice=<i>`` for a slice of a volume (so that every
    slice keeps its own row)."""
    out = []
    for item in batch:
        img = item[key]
        meta = dict(getattr(img, "meta", None) or item.get(f"{key}_meta_dict", {}))
        name = str(meta.get("filename_or_obj", item.get("id", "")))
        idx = meta.get("slice_index", item.get("slice_index", -1))
        idx = int(idx.reshape(-1)[0]) if isinstance(idx, torch.Tensor) else int(idx if idx is not None else -1)
        out.append({"filename_or_obj": name if idx < 0 else f"{name}#slice={idx}"})
    return out
