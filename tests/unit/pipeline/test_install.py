"""``dicom-node model install``: it says that a bundle is code and prints the weights'
SHA-256; a bundle whose weights do not load, or whose config is far too large, is refused
in one sentence, with nothing left in ``--dest``."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.pipeline.install import CODE_NOTICE
from tests.peers import SPLEEN_BUNDLE

pytestmark = pytest.mark.cost(5)


def _bundle(tmp_path: Path, name: str) -> Path:
    root = tmp_path / "src" / name
    shutil.copytree(SPLEEN_BUNDLE, root)
    return root


def _install(root: Path, dest: Path, capsys) -> tuple[int, str, str]:
    code = main(["model", "install", str(root), "--dest", str(dest)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_bundle_installs_saying_it_is_code_with_its_weights_digest(tmp_path, capsys):
    code, out, err = _install(SPLEEN_BUNDLE, tmp_path / "dest", capsys)
    assert code == 0, err
    assert out.startswith(CODE_NOTICE)
    assert "run with this user's rights" in CODE_NOTICE and "only bundles you trust" in CODE_NOTICE
    digest = hashlib.sha256((SPLEEN_BUNDLE / "models" / "model.ts").read_bytes()).hexdigest()
    assert f"weights: models/model.ts, SHA-256 {digest}" in out
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [SPLEEN_BUNDLE.name]


def _random_torchscript(root: Path) -> str:
    (root / "models" / "model.ts").write_bytes(os.urandom(64 * 1024))
    return "models/model.ts is not a TorchScript network"


def _zip_not_torchscript(root: Path) -> str:
    with zipfile.ZipFile(root / "models" / "model.ts", "w") as z:
        z.writestr("weights/readme.txt", "not a network")
    return "models/model.ts is not a TorchScript network"


def _random_checkpoint(root: Path) -> str:
    (root / "models" / "model.ts").unlink()
    (root / "models" / "model.pt").write_bytes(os.urandom(4096))
    return "models/model.pt is not a checkpoint torch.load reads with weights only"


def _checkpoint_that_runs_code(root: Path) -> str:
    (root / "models" / "model.ts").unlink()
    (root / "models" / "model.pt").write_bytes(pickle.dumps(print))  # a global: refused
    return "models/model.pt is not a checkpoint torch.load reads with weights only"


def _huge_metadata(root: Path) -> str:
    with open(root / "configs" / "metadata.json", "r+b") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: nothing is written, nothing need be read
    return "configs/metadata.json is 300 MiB; a bundle's config or metadata is at most 8 MiB"


@pytest.mark.parametrize(
    "break_it",
    [
        _random_torchscript,
        _zip_not_torchscript,
        _random_checkpoint,
        _checkpoint_that_runs_code,
        _huge_metadata,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_broken_bundle_is_refused_in_one_sentence_leaving_nothing(break_it, tmp_path, capsys):
    root = _bundle(tmp_path, "broken")
    reason = break_it(root)
    dest = tmp_path / "dest"
    code, out, err = _install(root, dest, capsys)
    assert code == 2
    assert out.startswith(CODE_NOTICE)
    (line,) = err.strip().splitlines()
    assert line.startswith(f"dicom-node: {root} is not a usable bundle: ") and reason in line
    assert "Traceback" not in err
    assert not dest.exists() or list(dest.iterdir()) == []
