"""MLflow tracking: MONAI's :class:`monai.handlers.MLFlowHandler` with artifacts logged under
their folder (``heatmaps/…``) instead of flat, runs tagged with the process that owns them (so that a
run whose process was killed is marked ``KILLED`` by the next start instead of staying ``RUNNING``
forever), and a helper for the run's parameters."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Sequence

from monai.handlers import MLFlowHandler

__all__ = ["SkipTSMLFlowHandler", "run_params", "default_run_name", "run_owner_tags", "close_stale_runs"]

logger = logging.getLogger(__name__)

#: run tags naming the process that writes the run
OWNER_PID_TAG, OWNER_HOST_TAG = "monai_skipts.pid", "monai_skipts.host"


def run_owner_tags() -> dict[str, str]:
    """Tags naming this process (PID and host) as the owner of an MLflow run."""
    return {OWNER_PID_TAG: str(os.getpid()), OWNER_HOST_TAG: socket.gethostname()}


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def close_stale_runs(client: Any, experiment_id: str, keep: str | None = None, status: str = "KILLED") -> list[str]:
    """Mark ``status`` (default ``KILLED``) the runs of ``experiment_id`` left ``RUNNING`` by a process of
    this machine that no longer exists (``kill -9``, power loss): MLflow itself never closes them.

    Only runs carrying :func:`run_owner_tags` are judged (their owner's PID and host); ``keep`` (the run
    name about to be continued by a resumed training) is left alone. Returns the run ids marked.
    """
    host, marked = socket.gethostname(), []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    for run in runs:
        tags = run.data.tags
        pid = tags.get(OWNER_PID_TAG, "")
        if run.info.run_name == keep or tags.get(OWNER_HOST_TAG) != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        client.set_tag(
            run.info.run_id,
            "monai_skipts.end_reason",
            f"process {pid} ended without closing the run; marked {status} by process {os.getpid()}",
        )
        client.set_terminated(run.info.run_id, status, end_time=int(time.time() * 1000))
        logger.warning(
            "MLflow run '%s' (%s) was left RUNNING by process %s, which no longer exists (killed?): marked %s",
            run.info.run_name,
            run.info.run_id,
            pid,
            status,
        )
        marked.append(run.info.run_id)
    return marked


def default_run_name(dataset: str, seed: int) -> str:
    """``<dataset>-seed<seed>-<UTC time>``: one MLflow run per training command."""
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
    ``artifacts_root`` and skip ``exclude`` suffixes (checkpoints, the tracking database, the output
    folder's lock).

    When it starts its run it first marks ``KILLED`` the runs of its experiment that a dead process of
    this machine left ``RUNNING`` (:func:`close_stale_runs`; its own run name, which a resumed training
    continues, excepted), and it tags its run with this process (:func:`run_owner_tags`)."""

    def __init__(
        self,
        *args: Any,
        artifacts_root: str | os.PathLike | None = None,
        exclude: Sequence[str] = (".pt", ".db", ".db-journal", ".lock"),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.artifacts_root = Path(artifacts_root) if artifacts_root is not None else None
        self.exclude = tuple(exclude)
        self._owner_tagged: str | None = None

    def start(self, engine: Any) -> None:
        if not self.cur_run:
            self._set_experiment()
            if self.experiment is not None:
                exp_id = self.experiment.experiment_id
                close_stale_runs(self.client, exp_id, keep=self.run_name)
                if self.run_name and not any(
                    r.info.run_name == self.run_name and r.info.status != self.run_finish_status
                    for r in self.client.search_runs([exp_id])
                ):  # a new run: created with its owner tags, so that no kill can leave it untagged
                    self.cur_run = self.client.create_run(exp_id, run_name=self.run_name, tags=run_owner_tags())
                    self._owner_tagged = self.cur_run.info.run_id
        super().start(engine)
        if self.cur_run and self._owner_tagged != self.cur_run.info.run_id:
            for k, v in run_owner_tags().items():
                self.client.set_tag(self.cur_run.info.run_id, k, v)
            self._owner_tagged = self.cur_run.info.run_id

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
