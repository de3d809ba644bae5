"""Which weights made a result: every result object names the bundle, its version, the SHA-256
of its weights file and the node's version, and stays valid (dciodvfy)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

import dicom_node
from dicom_node.config import PROJECT_ROOT, ResultSettings
from dicom_node.encode import (
    AlgorithmInfo,
    EncodeError,
    build_rtstruct,
    build_seg,
    build_sr,
    segment_info_for,
)
from dicom_node.pipeline import read_bundle_info
from dicom_node.series.volume import assemble_series
from dicom_node_testing.synthetic import write_ct_series
from tests.checks import dciodvfy_errors

DEMO = PROJECT_ROOT / "bundles" / "spleen_ct_demo"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The demo bundle's identification, and the SEG, RTSTRUCT and SR it names, on disk."""
    tmp = tmp_path_factory.mktemp("provenance")
    bundle = tmp / "spleen_ct_demo"
    shutil.copytree(DEMO, bundle)
    algorithm = AlgorithmInfo.of_bundle(read_bundle_info(bundle))
    hu = np.full((4, 32, 32), 40, dtype=np.int16)
    source = assemble_series(write_ct_series(hu, tmp / "ct", spacing=(3.0, 1.0, 1.0)))
    labels = np.zeros(hu.shape, np.uint8)
    labels[1:3, 8:20, 10:22] = 1
    segments = [segment_info_for(1, "spleen")]
    settings = ResultSettings()
    seg = build_seg(source, labels, segments, algorithm, settings)
    objects = {
        "SEG": seg,
        "RTSTRUCT": build_rtstruct(source, labels, segments, algorithm, settings),
        "SR": build_sr(seg, source, labels, segments, algorithm, settings),
    }
    paths = {}
    for kind, ds in objects.items():
        paths[kind] = tmp / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return bundle, algorithm, paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_bundle_names_its_weights_by_their_sha256(written):
    bundle, algorithm, _ = written
    assert algorithm.weights_sha256 == _sha256(bundle / "models" / "model.ts")
    assert (algorithm.name, algorithm.version) == ("Spleen CT segmentation (demo)", "0.1.0")
    assert algorithm.node_version == dicom_node.__version__


def test_a_replaced_weights_file_gets_a_new_hash(written, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(written[0], bundle)
    before = read_bundle_info(bundle).weights_sha256
    with (bundle / "models" / "model.ts").open("ab") as f:
        f.write(b"\0")
    assert read_bundle_info(bundle).weights_sha256 == _sha256(bundle / "models" / "model.ts")
    assert read_bundle_info(bundle).weights_sha256 != before


def _parameters(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(","))


def test_the_seg_names_bundle_version_weights_and_node(written):
    _, algorithm, paths = written
    seg = pydicom.dcmread(paths["SEG"])
    for segment in seg.SegmentSequence:
        (ident,) = segment.SegmentationAlgorithmIdentificationSequence
        assert ident.AlgorithmName == "Spleen CT segmentation (demo)"
        assert ident.AlgorithmVersion == "0.1.0"
        assert _parameters(ident.AlgorithmParameters) == {
            "weights_sha256": _sha256(written[0] / "models" / "model.ts"),
            "dicom_node_version": dicom_node.__version__,
        }
    assert seg.SoftwareVersions == dicom_node.__version__


def test_the_rtstruct_names_them_in_each_roi(written):
    _, algorithm, paths = written
    rt = pydicom.dcmread(paths["RTSTRUCT"])
    digest = _sha256(written[0] / "models" / "model.ts")
    for roi in rt.StructureSetROISequence:
        assert roi.ROIGenerationDescription == (
            f"Spleen CT segmentation (demo) 0.1.0 sha256:{digest[:16]}"
        )
        (ident,) = roi.ROIDerivationAlgorithmIdentificationSequence
        assert ident.AlgorithmName == "Spleen CT segmentation (demo)"
        assert _parameters(ident.AlgorithmParameters)["weights_sha256"] == digest


def test_the_sr_names_them_in_its_algorithm_identification(written):
    _, _, paths = written
    sr = pydicom.dcmread(paths["SR"])
    digest = _sha256(written[0] / "models" / "model.ts")
    found = []

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if name in ("Algorithm Name", "Algorithm Version", "Algorithm Parameters"):
                found.append((name, item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    groups = len(found) // 4
    assert groups >= 1 and len(found) == 4 * groups
    assert set(found) == {
        ("Algorithm Name", "Spleen CT segmentation (demo)"),
        ("Algorithm Version", "0.1.0"),
        ("Algorithm Parameters", f"weights_sha256={digest}"),
        ("Algorithm Parameters", f"dicom_node_version={dicom_node.__version__}"),
    }


@pytest.mark.parametrize("kind", ["SEG", "RTSTRUCT", "SR"])
def test_each_object_stays_valid(written, kind):
    assert dciodvfy_errors(written[2][kind]) == []


def test_a_malformed_hash_is_refused():
    with pytest.raises(EncodeError, match="SHA-256"):
        AlgorithmInfo("spleen", "1", weights_sha256="ABC")
