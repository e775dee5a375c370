"""MLflow tracking: MONAI's :class:`monai.handlers.MLFlowHandler` with artifacts logged under
their folder (``heatmaps/…``) instead of flat, and a helper for the run's parameters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from monai.handlers import MLFlowHandler

__all__ = ["SkipTSMLFlowHandler", "run_params", "default_run_name"]


def default_run_name(dataset: str, seed: int) -> str:
    """``<dataset>-seed<seed>-<UTC time>``: one MLflow run per training command."""
    import time

    return f"{dataset}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def run_params(network: Any, split: dict | None = None, **params: Any) -> dict[str, Any]:
    """MLflow params: the given hyper-parameters, the model configuration (the resolved teacher
    included) and the split counts. Values are flattened to strings by MLflow."""
    net = getattr(network, "module", network)
    out = {k: v for k, v in params.items()}
    out.update({f"model_{k}": v for k, v in net.config.items() if k != "teacher_weights_sha256"})
    out["teacher"] = net.config["teacher"]
    if split is not None:
        out.update({f"n_{k}": len(split[k]) for k in ("train", "val", "test") if k in split})
        dedup = split.get("report", {}).get("dedup", {})
        if isinstance(dedup, dict) and "n_removed" in dedup:
            out["n_duplicates_removed"] = dedup["n_removed"]
    return out


class SkipTSMLFlowHandler(MLFlowHandler):
    """:class:`monai.handlers.MLFlowHandler` whose artifacts keep their folder relative to
    ``artifacts_root`` and skip ``exclude`` suffixes (checkpoints, the tracking database)."""

    def __init__(self, *args: Any, artifacts_root: str | os.PathLike | None = None,
                 exclude: Sequence[str] = (".pt", ".db", ".db-journal"), **kwargs: Any):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.artifacts_root = Path(artifacts_root) if artifacts_root is not None else None
        self.exclude = tuple(exclude)

    def complete(self) -> None:
        if not (self.artifacts and self.cur_run):
            return
        for path in self._parse_artifacts():
            p = Path(path)
            if p.name.endswith(self.exclude) or "mlruns" in p.parts:
                continue
            sub = None
            if self.artifacts_root is not None:
                try:
                    rel = p.resolve().parent.relative_to(self.artifacts_root.resolve())
                    sub = None if str(rel) == "." else rel.as_posix()
                except ValueError:
                    sub = None
            self.client.log_artifact(self.cur_run.info.run_id, str(p), sub)
