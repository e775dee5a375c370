"""The DICOM app's command line (python -m monai_skipts.dicom_app) on a broken study or an unreachable PACS:
exit status 1 and one line per reason on stderr, naming the file or the host; an unreachable PACS fails
within seconds, before the model is loaded."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("highdicom", reason="the dicom extra: pip install -e '.[dicom]'")

from conftest import REPO  # noqa: E402


def test_incomplete_stack_exits_1_naming_the_file(mixed_study, dicom_checkpoint, tmp_path, one_thread, capsys):
    from monai_skipts.dicom_app import main

    root = tmp_path / "study"
    shutil.copytree(mixed_study, root)
    (root / "ct" / "17136.dcm").write_bytes(b"")
    rc = main(["--input", str(root), "--output", str(tmp_path / "out"), "--checkpoint", str(dicom_checkpoint)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    assert "error: ct/17136.dcm: cannot be read: empty file (0 bytes)" in err
    assert any(ln.startswith("error: series-001-CT: not scored: incomplete") and "ct/17136.dcm" in ln for ln in err)


def test_empty_study_folder_exits_1_with_the_reason(dicom_checkpoint, tmp_path, capsys):
    from monai_skipts.dicom_app import main

    (tmp_path / "empty").mkdir()
    rc = main(
        ["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"), "--checkpoint", str(dicom_checkpoint)]
    )
    assert rc == 1
    assert f"error: {tmp_path / 'empty'}: the folder holds no file" in capsys.readouterr().err


def test_unreachable_pacs_fails_fast_naming_the_host(dicom_checkpoint, tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    study_uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    env = dict(os.environ, OMP_NUM_THREADS="1", MONAI_SKIPTS_OFFLINE="1")
    args = ["--dicomweb", f"http://127.0.0.1:{port}/dicom-web", "--study", study_uid]
    args += ["--checkpoint", str(dicom_checkpoint), "--device", "cpu"]
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "monai_skipts.dicom_app", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - t
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot query the PACS at http://127.0.0.1:{port}/dicom-web: ConnectionError")
    assert f"host='127.0.0.1', port={port}" in last and "Connection refused" in last
    assert study_uid not in r.stderr + r.stdout
    assert elapsed < 10, f"{elapsed:.1f} s to fail"
