"""One table of datasets: ``monai_skipts.data.DATASETS`` declares each dataset's
layout, modality preset, Table I split, paper AUROC and display name once; the bundles, their
READMEs, the top-level README and the benchmark scripts must agree with it. Each test here fails when
one of those places is edited alone."""

from __future__ import annotations

import importlib
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from monai_skipts.data import DATASETS, LAYOUTS, get_dataset
from monai_skipts.transforms import PRESETS

REPO = Path(__file__).resolve().parents[2]
BUNDLED = {p.bundle: p for p in DATASETS.values() if p.bundle}
PAPER = [p for p in DATASETS.values() if p.paper_auroc is not None]


def _benchmark(module: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _modality_literals(node):
    """Every literal (not ``@``/``$``/``%``) value of a ``"modality"`` key in a config, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "modality" and isinstance(v, str) and v[:1] not in "@$%":
                yield v
            yield from _modality_literals(v)
    elif isinstance(node, list):
        for v in node:
            yield from _modality_literals(v)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# -- the table itself ----------------------------------------------------------------------------


def test_table_is_complete_and_consistent():
    assert len(PAPER) == 12  # the paper's Table II
    assert {"lgg", "demo", "mvtec"} <= set(DATASETS)
    for p in DATASETS.values():
        assert p.modality in PRESETS and (REPO / "transforms" / f"{p.modality}.json").is_file(), p.name
        assert p.layout in LAYOUTS, p.name
        assert p.display_name and p.source and p.layout_text, p.name
        assert 0 < p.val_fraction < 1, p.name
        assert get_dataset(p.name) is p
        if p.bundle:
            assert get_dataset(p.bundle_dataset or p.name).layout == p.layout, p.name
    for p in PAPER:
        assert p.table1 is not None and p.bundle, p.name
        assert get_dataset(p.bundle) is p and get_dataset(p.display_name) is p  # every spelling finds it
    for field in ("display_name", "bundle"):
        values = [getattr(p, field) for p in DATASETS.values() if getattr(p, field)]
        assert len(values) == len(set(values)), field
    with pytest.raises(ValueError, match="unknown modality preset"):
        type(PAPER[0])("x", "class_folders", modality="oct")


def test_modalities_are_the_medically_right_presets():
    """Pinned choices (the table's comments give the reasons); a change here is a change of results."""
    want = {
        "headct": "ct_brain",
        "brainmri": "mri",
        "lungct": "ct_lung",
        "busi": "ultrasound",
        "breastmri": "mri",
        "retinal_oct": "ultrasound",
        "cp_child_a": "rgb",
        "cp_child_b": "rgb",
        "nafld": "ultrasound",
        "iq_oth_nccd": "ct_lung",
        "covid_xray": "xray",
        "malaria": "rgb",
        "lgg": "mri",
        "mvtec": "rgb",
        "demo": "xray",
    }
    assert {n: p.modality for n, p in DATASETS.items()} == want


# -- the bundles ---------------------------------------------------------------------------------


def test_every_bundle_folder_is_a_table_entry():
    folders = {d.name for d in (REPO / "bundles").iterdir() if (d / "metadata.json").is_file()}
    assert folders == set(BUNDLED)


@pytest.mark.parametrize("bundle", sorted(BUNDLED))
def test_bundle_configs_agree_with_the_table(bundle):
    p = BUNDLED[bundle]
    d = REPO / "bundles" / bundle
    train = json.loads((d / "train.json").read_text())
    evaluate = ConfigParser.load_config_files([str(d / "train.json"), str(d / "evaluate.json")])  # as MONAI merges
    meta = json.loads((d / "metadata.json").read_text())
    for cfg in (train, evaluate):
        assert cfg["modality"] == p.modality
        assert cfg["dataset"] == (p.bundle_dataset or p.name)
        assert get_dataset(cfg["dataset"]).layout == p.layout
        assert cfg["val_fraction"] == p.val_fraction
    # the preset's chain: pulled with MONAI's macro, or written out as transforms/<modality>.json has it
    fragment = json.loads((REPO / "transforms" / f"{p.modality}.json").read_text())["preprocessing"]
    assert train["preprocessing"] in (f"%transforms/{p.modality}.json#preprocessing", fragment)
    for cfg in (train, evaluate):  # whatever names a preset anywhere in the config names the table's
        assert set(re.findall(r"%transforms/(\w+)\.json", json.dumps(cfg))) <= {p.modality}
        assert set(_modality_literals(cfg)) <= {p.modality}
    assert meta["paper_auroc"] == p.paper_auroc
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == p.modality


@pytest.mark.parametrize("bundle", sorted(b for b in BUNDLED if (REPO / "bundles" / b / "README.md").is_file()))
def test_bundle_readme_agrees_with_the_table(bundle):
    p = BUNDLED[bundle]
    text = (REPO / "bundles" / bundle / "README.md").read_text()
    flat = _flat(text)
    assert text.splitlines()[0] == f"# {bundle}: Skip-TS on {p.display_name}"
    assert set(re.findall(r"transforms/(\w+)\.json", text)) == {p.modality}
    assert f"Modality preset: `transforms/{p.modality}.json`" in flat
    paper = re.findall(r"Paper AUROC \(Skip-TS, WRN50 teacher\): \*\*([\d.]+)\*\*", flat)
    if p.paper_auroc is None:
        assert paper == [] and "Not in the paper." in flat
    else:
        assert [float(x) for x in paper] == [p.paper_auroc] and "Not in the paper" not in flat
    split = re.findall(r"train normal / test normal & abnormal\): (\d+) / (\d+) & (\d+)", flat)
    if p.table1 is not None:
        assert [tuple(int(x) for x in s) for s in split] == [p.table1]
    else:
        assert split == []
    if p.group_by:
        shares = re.search(r"(\d+) % of the patients go to test .*?, (\d+) % of the others", flat)
        assert shares and (int(shares[1]), int(shares[2])) == (
            round(100 * p.test_fraction),
            round(100 * p.val_fraction),
        )
    assert f"Data: {p.source}." in flat and f"Source layout under `--dataset_dir`: {p.layout_text}." in flat


# -- README.md, docs/results.md and the benchmarks' README ---------------------------------------------


def test_readme_and_results_agree_with_the_table():
    """README.md lists the paper datasets' bundles in Table II order and its results table gives each
    dataset's paper AUROC; docs/results.md's paper AUROC sentences, results rows and bundle/preset
    pairs agree with the table."""
    by_display = {p.display_name: p for p in DATASETS.values()}
    readme = (REPO / "README.md").read_text()
    # "Every paper dataset has a bundle: `bundles/{headct,...}/`": the paper datasets, in Table II order
    listed = re.search(r"Every paper dataset has a bundle: `bundles/\{([^}]*)\}/`", _flat(readme))
    assert listed and [b.strip() for b in listed[1].split(",")] == [p.bundle for p in PAPER]
    # the README's results table: | dataset | ... | paper (WRN50) |
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows and rows[0].rstrip(" |").endswith("paper (WRN50)")
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        p = by_display[cells[0].split(" (")[0]]
        assert cells[-1] == ("–" if p.paper_auroc is None else f"{p.paper_auroc:.1f}"), line
    results = (REPO / "docs" / "results.md").read_text()
    flat = _flat(results)
    # "Paper AUROC (WRN50): BrainMRI 88.2, IQ-OTH/NCCD 97.3; LGG is not in the paper."
    sentences = re.findall(r"Paper AUROC \(WRN50\): ([^;.]*(?:\.\d[^;.]*)*)[;.]", flat)
    assert sentences
    for sentence in sentences:
        pairs = re.findall(r"([A-Za-z][\w/ -]*?) (\d+\.\d)", sentence)
        assert pairs
        for name, value in pairs:
            assert name.strip() in by_display, name
            assert by_display[name.strip()].paper_auroc == float(value), name
    for name in re.findall(r"(\S+) is not in the paper", flat):
        assert name in by_display and by_display[name].paper_auroc is None, name
    # the results table's rows name datasets by their display names
    names = re.findall(r"^\| ([^|(]+?) \(\d+ \+ \d+", results, re.M)
    assert names and all(name in by_display for name in names), names
    # a line that names a bundle and a modality preset names that bundle's preset
    for line in (readme + results).splitlines():
        for b in re.findall(r"bundles/(\w+)/", line):
            for m in re.findall(r"transforms/(\w+)\.json", line):
                if b in BUNDLED:
                    assert m == BUNDLED[b].modality, line


def test_benchmark_readme_paper_column_agrees_with_the_table():
    """benchmarks/README.md's tables (quality.py's output): the "paper Skip-TS" column per dataset."""
    rows = 0
    lines = (REPO / "benchmarks" / "README.md").read_text().splitlines()
    header = None
    for line in lines:
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if not header[-1].startswith("paper Skip-TS") or set(cells[0]) <= set("-") or cells[0].startswith("**"):
            continue
        p = get_dataset(cells[0])
        assert cells[-1] == ("–" if p.paper_auroc is None else f"{p.paper_auroc:.1f}"), line
        rows += 1
    assert rows >= 2


# -- the benchmark scripts -----------------------------------------------------------------------


def test_protocol_resolves_every_dataset_to_the_table(monkeypatch):
    protocol = _benchmark("protocol")
    for p in DATASETS.values():
        for spelling in {p.name, p.display_name, p.bundle or p.name}:
            assert protocol.default_modality(spelling) == p.modality, spelling
    with pytest.raises(ValueError, match="unknown dataset"):
        protocol.default_modality("mnist")
    with pytest.raises(ValueError, match="no modality preset"):  # a bare layout: no silent fallback
        protocol.default_modality("class_folders")

    # run_protocol itself preprocesses with the table's preset
    class Seen(Exception):
        pass

    def fake_preprocessing(modality, **kwargs):
        raise Seen(modality)

    monkeypatch.setattr(protocol, "prepare_split", lambda *a, **k: {"train": [], "test": []})
    monkeypatch.setattr(protocol, "build_preprocessing", fake_preprocessing)
    for p in DATASETS.values():
        with pytest.raises(Seen) as seen:
            protocol.run_protocol(p.name, "unused", "unused")
        assert seen.value.args[0] == p.modality, p.name


def test_quality_resolves_every_dataset_to_the_table(tmp_path, monkeypatch):
    quality = _benchmark("quality")
    wanted = [p for p in DATASETS.values() if p.folders]
    assert {p.name for p in PAPER} | {"lgg"} <= {p.name for p in wanted}
    for p in wanted:
        (tmp_path / p.folders[-1]).mkdir(exist_ok=True)
    found = quality.find_datasets(tmp_path)
    assert [(n, m, a) for n, m, a, _ in found] == [(p.name, p.modality, p.paper_auroc) for p in wanted]
    assert all(root.name in DATASETS[n].folders for n, _, _, root in found)
    # spellings and aliases select the same entries
    assert [f[0] for f in quality.find_datasets(tmp_path, ["IQ-OTH/NCCD", "HeadCT", "cpchild_b"])] == [
        "headct",
        "cp_child_b",
        "iq_oth_nccd",
    ]
    with pytest.raises(ValueError, match="unknown dataset"):
        quality.find_datasets(tmp_path, ["mnist"])
    with pytest.raises(ValueError, match="not a benchmark dataset"):
        quality.find_datasets(tmp_path, ["demo"])
    assert quality.PAPER_AVERAGE == round(statistics.mean(p.paper_auroc for p in PAPER), 1)

    # each run splits with the table's calibration share
    class Seen(Exception):
        pass

    def fake_split(name, root, **kwargs):
        raise Seen(kwargs["val_fraction"])

    monkeypatch.setattr(quality, "prepare_split", fake_split)
    for p in wanted:
        with pytest.raises(Seen) as seen:
            quality.DatasetRun(p.name, tmp_path, p.modality, 0, 32, None, tmp_path, 1, None, {})
        assert seen.value.args[0] == p.val_fraction, p.name
