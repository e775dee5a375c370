"""Standard bundles out: ``python -m monai_skipts.bundle export`` writes a trained model
as a MONAI bundle zip that MONAI's own runner executes from any working directory, with nothing from
this repository: once with the development install, once in a fresh venv where monai-skipts is
installed from a built wheel. (MONAI Label's ``BundleInferTask`` serving it: tests/label/test_bundle_task.py.)

A tiny BrainMRI-layout model is trained once for the module through the repository's bundle
(1 epoch, 64², the offline teacher) and exported with the documented command.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from test_bundles import make_layout

from monai_skipts.bundle.checks import expression_share
from monai_skipts.bundle.metadata import METADATA_REQUIRED, TENSOR_SPEC_REQUIRED, check_metadata
from monai_skipts.bundle.runtime import MODEL_FILES_KEY, running_bundle_root
from monai_skipts.utils import file_sha256

#: the bundles' limit on the share of a config that is Python in ``$`` expressions (as bundles/common/)
MAX_SHARE = 0.10

NAME = "skipts_brainmri"
LAYOUT = [
    "configs/metadata.json",
    "configs/inference.json",
    "configs/logging.conf",
    "models/model.pt",
    "models/model.ts",
    "docs/README.md",
    "LICENSE",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", "MONAI_SKIPTS_OFFLINE": "1", **extra}


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or _env())
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(zip, checkpoint, data folder)``: a tiny trained model exported with the README's command."""
    tmp = tmp_path_factory.mktemp("bundle_export")
    data, run = tmp / "data", tmp / "run"
    make_layout("brainmri", data)
    _run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "bundles/brainmri/train.json",
            "--dataset_dir",
            str(data),
            "--output_dir",
            str(run),
            "--epochs",
            "1",
            "--spatial_size",
            "64",
            "--teacher",
            "efficientnet_lite0",
            "--mlflow",
            "False",
            "--target_fpr",
            "0.5",
            "--calibration",
            "empirical",
        ],
        cwd=REPO,
    )
    out = tmp / f"{NAME}.zip"
    r = _run(
        [
            sys.executable,
            "-m",
            "monai_skipts.bundle",
            "export",
            "--config_file",
            "bundles/brainmri/train.json",
            "--checkpoint",
            str(run / "model.pt"),
            "--out",
            str(out),
        ],
        cwd=REPO,
    )
    assert json.loads(r.stdout.strip().splitlines()[-1])["out"] == str(out)
    return out, run / "model.pt", data


def _unzip(zip_path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(dest)
    return dest / NAME


def _predictions(csv_path: Path) -> dict[str, tuple[float, bool]]:
    """``{id: (score, anomalous)}`` of a ``predictions.csv`` (the package's columns)."""
    with open(csv_path, newline="") as f:
        return {row["id"]: (float(row["score"]), row["anomalous"] == "True") for row in csv.DictReader(f)}


def _reference(checkpoint: Path, data: Path) -> dict[str, dict]:
    """The package's predictor (monai_skipts.inference.AnomalyPredictor) on the same images, by id."""
    from monai_skipts.inference import AnomalyPredictor, list_inputs

    pred = AnomalyPredictor(checkpoint, device="cpu")
    return {r["id"]: r for r in pred.predict_items(list_inputs(data))}


def _check_scores(got: dict[str, tuple[float, bool]], want: dict[str, dict]) -> None:
    assert set(got) == set(want) and len(got) == 13  # brainmri layout: 10 normal + 3 abnormal images
    for f, (score, anomalous) in got.items():
        assert score == pytest.approx(want[f]["score"], abs=1e-4), f
        thr = want[f]["threshold"]
        assert anomalous == (score >= thr), f  # the bundle's decision on its own score
        if abs(want[f]["score"] - thr) > 1e-4:  # the empirical threshold is a validation normal's score: a tie
            assert anomalous == want[f]["anomalous"], f


def _bundle_run(root: Path, inputs: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the unzipped bundle ``root`` from ``cwd``, with this checkout's
    package (``PYTHONPATH``; the fresh-venv test runs it without); the exit status is the caller's to
    check."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(root / "configs" / "inference.json")]
    cmd += ["--input", str(inputs), "--output_dir", str(out)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=_env(PYTHONPATH=str(REPO)))


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _gray_pngs(folder: Path, names: list[str], seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(folder / name)
    return folder


# the MONAI bundle specification's required metadata, as a JSON schema: a local stand-in for the schema
# that `monai.bundle verify_metadata` downloads from GitHub (unreachable from the test machines)
SPEC_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": list(METADATA_REQUIRED),
    "properties": {
        **{
            k: {"type": "string"}
            for k in (
                "version",
                "monai_version",
                "pytorch_version",
                "numpy_version",
                "task",
                "description",
                "authors",
                "copyright",
            )
        },
        "changelog": {"type": "object"},
        "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
        "references": {"type": "array"},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "additionalProperties": {"$ref": "#/definitions/tensor"}},
                "outputs": {"type": "object", "additionalProperties": {"$ref": "#/definitions/tensor"}},
            },
        },
    },
    "definitions": {
        "tensor": {
            "type": "object",
            "required": list(TENSOR_SPEC_REQUIRED),
            "properties": {
                "type": {"type": "string"},
                "format": {"type": "string"},
                "modality": {"type": "string"},
                "num_channels": {"type": "integer"},
                "spatial_shape": {"type": "array"},
                "dtype": {"type": "string"},
                "value_range": {"type": "array"},
                "is_patch_data": {"type": "boolean"},
                "channel_def": {"type": "object"},
            },
        }
    },
}


def test_zip_layout_metadata_and_self_contained_configs(exported, tmp_path):
    import monai
    from monai.bundle import ConfigParser

    zip_path, checkpoint, _ = exported
    with zipfile.ZipFile(zip_path) as z:
        assert sorted(z.namelist()) == sorted(f"{NAME}/{f}" for f in LAYOUT)
    root = _unzip(zip_path, tmp_path)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    for key in METADATA_REQUIRED:
        assert key in meta, key
    check_metadata(meta)
    assert meta["version"] in meta["changelog"] and meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0] and meta["numpy_version"] == np.__version__
    assert meta["required_packages_version"]["monai-skipts"] == "0.1.0"
    assert "efficientnet-lite-pytorch" in meta["required_packages_version"]
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == pred["spatial_shape"] == [64, 64] and image["num_channels"] == 3
    assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": "anomaly"}
    ckpt = torch.load(checkpoint, weights_only=True)
    assert meta["anomaly_threshold"]["value"] == pytest.approx(float(ckpt["state_dict"]["threshold"]))
    assert "auroc" in meta["eval_metrics"]
    broken = dict(meta, network_data_format={"inputs": {"image": {"type": "image"}}, "outputs": {}})
    with pytest.raises(ValueError, match="inputs.image: missing 'format'"):
        check_metadata(broken)

    # self-contained: no macros into other files, no paths of this repository, files via @bundle_root
    text = (root / "configs" / "inference.json").read_text()
    assert "%" not in text and "bundles/" not in text and str(REPO) not in text and "transforms/" not in text
    cfg = json.loads(text)
    assert cfg["bundle_root"] == "$monai_skipts.bundle.runtime.running_bundle_root()"
    assert cfg["run"][0]["_target_"] == "monai_skipts.bundle.runtime.run_bundle_inference"
    for key in ("network_def", "preprocessing", "inferer", "postprocessing", "run"):  # MONAI Label's keys
        assert key in cfg, key
    expr, total = expression_share(root / "configs" / "inference.json")  # the bundles' rule: logic in Python
    assert expr / total <= MAX_SHARE, f"{100 * expr / total:.1f} % of inference.json is Python in $ expressions"
    parser = ConfigParser(cfg)
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def")
    stored = torch.load(root / "models" / "model.pt", weights_only=True)
    net.load_state_dict(stored["model"])  # strict: every key, where MONAI Label's BundleInferTask reads them
    assert stored["state_dict"] is stored["model"] and stored["kind"] == "monai-skipts/checkpoint"
    for rel, digest in meta[MODEL_FILES_KEY].items():
        assert file_sha256(root / rel) == digest, rel
    assert sorted(meta[MODEL_FILES_KEY]) == ["models/model.pt", "models/model.ts"]
    assert (
        "spatial_size" in (root / "docs" / "README.md").read_text()
        or "64x64" in (root / "docs" / "README.md").read_text()
    )
    assert "Apache License" in (root / "LICENSE").read_text()

    # models/model.ts: MONAI's TorchScript with the metadata embedded; the map of the checkpoint's model
    from monai.data import load_net_with_metadata

    from monai_skipts.checkpoint import load_detector
    from monai_skipts.inferers import SkipTSInferer

    ts, ts_meta, extra = load_net_with_metadata(str(root / "models" / "model.ts"), more_extra_files=["inference.json"])
    assert ts_meta["version"] == meta["version"] and json.loads(extra["inference.json"]) == json.loads(text)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        amap, score = load_detector(checkpoint)(x)
        torch.testing.assert_close(ts(x)[0], amap, atol=1e-4, rtol=0)
        torch.testing.assert_close(SkipTSInferer()(x, net.eval()), amap, atol=1e-4, rtol=0)
        torch.testing.assert_close(ts(x)[1], score, atol=1e-4, rtol=0)


def test_monai_verify_metadata(exported, tmp_path):
    """MONAI's own ``verify_metadata`` on the exported metadata, against the specification's required
    fields (:data:`SPEC_SCHEMA`; the file is present at ``filepath``, so MONAI skips the download).
    Needs ``jsonschema``, which neither MONAI nor this package installs."""
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    root = _unzip(exported[0], tmp_path)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SPEC_SCHEMA))
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(schema))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["value_range"]
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="value_range"):
        verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(schema))


def test_monai_bundle_run_writes_what_the_package_inference_writes(exported, tmp_path):
    """`python -m monai.bundle run --config_file <unzipped>/configs/inference.json --input ...` from a
    folder that is neither the repository nor the bundle, without --bundle_root, and
    `python -m monai_skipts.inference` with the training checkpoint on the same folder: the same
    predictions.csv (header, columns, ids relative to the input, map names), scores, decisions and
    maps, and an empty errors.csv."""
    zip_path, checkpoint, data = exported
    root = _unzip(zip_path, tmp_path / "unzipped")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    r = _bundle_run(root, data, Path("out"), cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    cli = cwd / "cli"
    _run(
        [sys.executable, "-m", "monai_skipts.inference", "--checkpoint", str(checkpoint), "--input", str(data)]
        + ["--output_dir", str(cli), "--device", "cpu"],
        cwd=cwd,
        env=_env(PYTHONPATH=str(REPO)),
    )
    got_cols, got = _rows(cwd / "out" / "predictions.csv")
    want_cols, want = _rows(cli / "predictions.csv")
    assert got_cols == want_cols and got_cols[:4] == ["id", "score", "threshold", "anomalous"]
    assert [(g["id"], g["map"], g["anomalous"], g["threshold"]) for g in got] == [
        (w["id"], w["map"], w["anomalous"], w["threshold"]) for w in want
    ]
    assert "no/img000.jpg" in {g["id"] for g in got} and got[0]["map"].endswith(".map.png")
    for g, w in zip(got, want):
        assert float(g["score"]) == pytest.approx(float(w["score"]), abs=1e-4), g["id"]
    _check_scores(_predictions(cwd / "out" / "predictions.csv"), _reference(checkpoint, data))
    maps = sorted(p.relative_to(cwd / "out").as_posix() for p in (cwd / "out" / "maps").rglob("*"))
    assert maps == sorted(p.relative_to(cli).as_posix() for p in (cli / "maps").rglob("*"))
    assert _rows(cwd / "out" / "errors.csv") == (["file", "reason"], [])
    assert json.loads((cwd / "out" / "status.json").read_text())["status"] == "complete"


def test_monai_bundle_run_scores_rgb_pngs(exported, tmp_path):
    from PIL import Image

    root = _unzip(exported[0], tmp_path / "unzipped")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(rgb / f"x{i}.png")
    r = _bundle_run(root, rgb, tmp_path / "out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, rows = _rows(tmp_path / "out" / "predictions.csv")
    assert [(row["id"], row["map"]) for row in rows] == [
        ("x0.png", "maps/x0.png.map.png"),
        ("x1.png", "maps/x1.png.map.png"),
    ]
    assert all((tmp_path / "out" / row["map"]).is_file() for row in rows)


def test_monai_bundle_run_keeps_one_map_per_input_when_names_collide(exported, tmp_path):
    """img.png and img.jpg: two rows, two maps (neither overwrites the other)."""
    root = _unzip(exported[0], tmp_path / "unzipped")
    data = _gray_pngs(tmp_path / "coll", ["img.png"])
    _gray_pngs(tmp_path / "jpg", ["img.jpg"], seed=1)
    shutil.move(tmp_path / "jpg" / "img.jpg", data / "img.jpg")
    r = _bundle_run(root, data, tmp_path / "out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, rows = _rows(tmp_path / "out" / "predictions.csv")
    assert {row["id"]: row["map"] for row in rows} == {
        "img.jpg": "maps/img.jpg.map.png",
        "img.png": "maps/img.png.map.png",
    }
    assert sorted(p.name for p in (tmp_path / "out" / "maps").iterdir()) == ["img.jpg.map.png", "img.png.map.png"]


def test_monai_bundle_run_scores_the_others_when_one_file_is_bad(exported, tmp_path):
    """6 good PNGs and a truncated one: the 6 are scored, errors.csv names the bad one, the exit status
    is not 0 and stderr ends with one line naming it (as ``python -m monai_skipts.inference``)."""
    root = _unzip(exported[0], tmp_path / "unzipped")
    data = _gray_pngs(tmp_path / "data", [f"{i:03d}.png" for i in range(6)])
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a picture")
    r = _bundle_run(root, data, tmp_path / "out", tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    last = _last_line(r.stderr)
    assert last.startswith("error: ") and "1 of 7 inputs could not be scored" in last and "broken.png" in last
    assert "Traceback" not in r.stderr
    _, rows = _rows(tmp_path / "out" / "predictions.csv")
    assert [row["id"] for row in rows] == [f"{i:03d}.png" for i in range(6)]
    _, errors = _rows(tmp_path / "out" / "errors.csv")
    assert [e["file"] for e in errors] == ["broken.png"]
    assert json.loads((tmp_path / "out" / "status.json").read_text())["status"] == "incomplete"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_monai_bundle_run_refuses_a_pickle_as_model_pt(exported, tmp_path):
    """A crafted pickle in place of models/model.pt is not loaded (no code runs): one line naming the
    file, without torch's advice to load it with weights_only=False."""
    import pickle

    root = _unzip(exported[0], tmp_path / "unzipped")
    (root / "models" / "model.pt").write_bytes(pickle.dumps({"kind": _Exploit()}))
    data = _gray_pngs(tmp_path / "data", ["a.png"])
    r = _bundle_run(root, data, tmp_path / "out", tmp_path)
    assert r.returncode == 1 and not (tmp_path / "pwned.txt").exists()
    last = _last_line(r.stderr)
    assert last.startswith("error: ") and "model.pt: refused" in last and "could execute code" in last
    assert "weights_only=False" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_monai_bundle_run_refuses_a_corrupt_model_ts(exported, tmp_path):
    """A byte changed in models/model.ts (which MONAI Label and TorchScript servers load): the bundle
    refuses to run, naming the file, before scoring anything."""
    root = _unzip(exported[0], tmp_path / "unzipped")
    ts = root / "models" / "model.ts"
    data = bytearray(ts.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ts.write_bytes(bytes(data))
    r = _bundle_run(root, _gray_pngs(tmp_path / "data", ["a.png"]), tmp_path / "out", tmp_path)
    assert r.returncode == 1
    last = _last_line(r.stderr)
    assert last.startswith("error: ") and "model.ts: refused" in last and "metadata.json" in last
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_running_bundle_root_outside_a_workflow_is_the_default():
    assert running_bundle_root() == "." and running_bundle_root("/x") == "/x"


def test_cli_refuses_what_it_cannot_write(tmp_path, capsys):
    from monai_skipts.bundle.__main__ import main

    assert (
        main(
            [
                "export",
                "--config_file",
                "bundles/brainmri/train.json",
                "--checkpoint",
                str(tmp_path / "m.pt"),
                "--out",
                str(tmp_path / "b.tar"),
            ]
        )
        == 1
    )
    assert "written as a .zip" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--config_file",
                str(REPO / "bundles/brainmri/train.json"),
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--out",
                str(tmp_path / "b.zip"),
            ]
        )
        == 1
    )
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "b.zip").exists()


def test_fresh_venv_with_the_package_installed_from_a_wheel(exported, tmp_path):
    """A wheel built from the sources, installed (not editable) in a new venv; MONAI runs the unzipped
    bundle from another folder there, the repository out of reach (not on sys.path, not the cwd).

    The new venv gets the third-party dependencies (torch, MONAI, ...) by a ``.pth`` line naming the
    development venv's site-packages (a path entry: that folder's own ``.pth`` files, among them the
    editable install's finder, are not run), so the test needs no multi-GB download. With
    ``SKIPTS_BUNDLE_FULL_INSTALL=1`` the wheel is installed with its dependencies from the package
    index instead (slow)."""
    zip_path, checkpoint, data = exported
    src = tmp_path / "src"  # a copy: setuptools builds in-tree (build/, *.egg-info), not in the shared checkout
    src.mkdir()
    for f in ("setup.py", "README.md"):
        shutil.copy(REPO / f, src / f)
    shutil.copytree(REPO / "monai_skipts", src / "monai_skipts", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("monai_skipts-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "monai_skipts/bundle/export.py" in z.namelist() and not any(n.startswith("tests/") for n in z.namelist())

    venv = tmp_path / "venv"
    full = os.environ.get("SKIPTS_BUNDLE_FULL_INSTALL") == "1"
    _run([sys.executable, "-m", "venv", *([] if full else ["--without-pip"]), str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    if full:
        _run([str(py), "-m", "pip", "install", "-q", f"{wheel}[offline]"], cwd=tmp_path, timeout=3600)
    else:
        site = Path(
            subprocess.check_output(
                [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
            ).strip()
        )
        _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
        (site / "_skipts_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    probe = (
        "import json, sys, monai_skipts, monai_skipts.bundle.export as e; from importlib import metadata; "
        "d = metadata.distribution('monai-skipts'); "
        "print(json.dumps({'file': monai_skipts.__file__, 'path': sys.path, 'prefix': sys.prefix, "
        "'direct_url': d.read_text('direct_url.json')}))"
    )
    info = json.loads(_run([str(py), "-c", probe], cwd=cwd).stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(venv)) and not info["file"].startswith(str(REPO))
    assert not any(p and Path(p).resolve() == REPO for p in info["path"]), "the repository is importable"
    assert "editable" not in (info["direct_url"] or "")  # installed from the wheel file

    root = _unzip(zip_path, tmp_path / "unzipped")
    _run(
        [
            str(py),
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(root / "configs" / "inference.json"),
            "--input",
            str(data),
            "--output_dir",
            str(cwd / "out"),
            "--save_maps",
            "False",
        ],
        cwd=cwd,
    )
    _check_scores(_predictions(cwd / "out" / "predictions.csv"), _reference(checkpoint, data))
