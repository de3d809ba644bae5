"""Installing MONAI bundles: a folder is copied and checked; a broken one is refused clearly."""

from __future__ import annotations

import shutil

from dicom_node.cli import main
from dicom_node.config import PROJECT_ROOT
from dicom_node.pipeline import load_bundle

DEMO = PROJECT_ROOT / "bundles" / "spleen_ct_demo"


def test_install_a_bundle_folder(tmp_path, capsys):
    assert main(["model", "install", str(DEMO), "--dest", str(tmp_path / "bundles")]) == 0
    installed = tmp_path / "bundles" / "spleen_ct_demo"
    bundle = load_bundle(installed)
    assert bundle.labels == load_bundle(DEMO).labels
    assert (installed / "models" / "model.ts").read_bytes() == (DEMO / "models" / "model.ts").read_bytes()
    assert f'bundle = "{installed}"' in capsys.readouterr().out
    # a second install does not overwrite
    assert main(["model", "install", str(DEMO), "--dest", str(tmp_path / "bundles")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_bundle_without_its_network_is_refused(tmp_path, capsys):
    broken = tmp_path / "src" / "broken_bundle"
    shutil.copytree(DEMO, broken)
    (broken / "models" / "model.ts").unlink()
    assert main(["model", "install", str(broken), "--dest", str(tmp_path / "bundles")]) == 2
    err = capsys.readouterr().err
    assert "is not a usable bundle" in err and "Traceback" not in err
    assert not (tmp_path / "bundles" / "broken_bundle").exists()
