"""Records the scores of a version-1 checkpoint (the format before the AnomalyDetector) on fixed files.

Run at the code that wrote version-1 checkpoints (commit b007494, with this file and
``v1_checkpoint.py`` copied beside it): ``python make_v1_scores.py tests/data/v1_scores_<cpu>.json``.
The last bits of the scores depend on the CPU's float kernels, so there is one file per kind of CPU
recorded; ``tests/test_checkpoint.py`` rebuilds the same checkpoint and checks that today's loader
scores it bit-identically to one of them.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from v1_checkpoint import fixed_files, v1_payload  # noqa: E402


def main(out: str) -> None:
    import tempfile

    from monai_skipts.inference import AnomalyPredictor

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        payload = v1_payload()
        ckpt = Path(tmp) / "model.pt"
        torch.save(payload, ckpt)
        files = fixed_files(Path(tmp))
        pred = AnomalyPredictor(ckpt, device="cpu")
        rec = {"cpu": cpu_name(), "student_sha256": payload_sha(payload), "scores": {}, "map_sha256": {}}
        rec["decisions"] = {}
        for name, path in files.items():
            r = pred.score_file(path, maps=True)
            amap = r["map"] if "map" in r else None
            rec["scores"][name] = float(r["score"]).hex()
            rec["decisions"][name] = {k: r.get(k) for k in ("anomalous", "normalized_score", "threshold")}
            if amap is not None:
                a = amap.as_tensor() if hasattr(amap, "as_tensor") else torch.as_tensor(amap)
                rec["map_sha256"][name] = hashlib.sha256(a.float().contiguous().numpy().tobytes()).hexdigest()
    Path(out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's description."""
    import platform

    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def payload_sha(payload) -> str:
    h = hashlib.sha256()
    for k, v in sorted(payload["student"].items()):
        h.update(k.encode())
        h.update(v.float().contiguous().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    main(sys.argv[1])
