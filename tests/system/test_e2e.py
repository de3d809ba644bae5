"""Scanner to viewer with real parts only: storescu -> node -> Triton -> SEG/RTSTRUCT/SR -> Orthanc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.inference.triton.shm import named_regions
from dicom_node.series.volume import assemble_series
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests import checks
from tests.peers import NodeProcess, Orthanc, managed_triton, pacs_destination, storescu

pytestmark = [pytest.mark.slow, pytest.mark.cost(30)]

RESULT_MODALITIES = ("SEG", "RTSTRUCT", "SR")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    p = Orthanc(tmp_path_factory.mktemp("pacs")).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    n = NodeProcess(
        tmp_path_factory.mktemp("node"),
        node={"settle_seconds": 1.0},
        inference=managed_triton(),
        destinations=[pacs_destination(pacs)],
    ).start()
    yield n
    n.stop()


def _finished(series_uid: str):
    def done(jobs: list[dict]) -> bool:
        job = next((j for j in jobs if j["series_uid"] == series_uid), None)
        if job is None or job["state"] == "failed":
            if job is not None:
                raise AssertionError(f"job failed: {job['reason']}")
            return False
        return job["state"] == "done" and all(o["state"] == "sent" for o in job["outbox"])

    return done


def _study_results(pacs: Orthanc, study_uid: str, out_dir: Path) -> dict[str, list[Path]]:
    found = pacs.rest(
        "/tools/find",
        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
    )
    out: dict[str, list[Path]] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for inst in found:
        path = out_dir / f"{inst['ID']}.dcm"
        path.write_bytes(pacs.file(inst["ID"]))
        modality = str(pydicom.dcmread(path, stop_before_pixels=True).Modality)
        out.setdefault(modality, []).append(path)
    return out


def _check_results(results: dict[str, list[Path]], ct_paths: list[Path]) -> None:
    for modality in RESULT_MODALITIES:
        assert len(results.get(modality, [])) == 1, {m: len(v) for m, v in results.items()}
        errors = checks.dciodvfy_errors(results[modality][0])
        assert errors == [], (modality, errors)
    run = checks.dcentvfy([*ct_paths, *(results[m][0] for m in RESULT_MODALITIES)])
    assert run.returncode == 0, run.stdout + run.stderr


def test_phantom_from_scanner_to_pacs(node, pacs, tmp_path):
    phantom = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=4242)
    attrs = SeriesAttributes(patient_name="E2E^Phantom", patient_id="E2E-1")
    ct_paths = write_ct_series(
        phantom.hu, tmp_path / "ct", spacing=phantom.spacing, origin=phantom.origin, attrs=attrs
    )
    assert storescu(node.port, tmp_path / "ct").returncode == 0
    node.wait_for(
        _finished(attrs.series_instance_uid),
        timeout=600,
        what="results in the PACS",
        failures_allowed=False,
    )

    results = _study_results(pacs, attrs.study_instance_uid, tmp_path / "from-pacs")
    _check_results(results, ct_paths)

    source = assemble_series(ct_paths)
    expected = checks.resample_nearest(
        phantom.spleen, phantom.affine, source.affine, source.array.shape
    ).astype(bool)
    seg_path = results["SEG"][0]
    seg = checks.seg_mask(seg_path, source)
    d = checks.dice(seg, expected)
    print(f"e2e phantom: SEG Dice vs phantom spleen {d:.3f}")
    assert d >= 0.9
    slices_with_spleen = {source.source_uids[k] for k in np.flatnonzero(seg.any(axis=(1, 2)))}
    assert checks.seg_referenced_uids(seg_path) == slices_with_spleen

    (contoured,) = checks.rtstruct_masks(results["RTSTRUCT"][0], source).values()
    d_rt = checks.dice(contoured, seg)
    print(f"e2e phantom: RTSTRUCT vs SEG Dice {d_rt:.4f}")
    assert d_rt >= 0.95

    (volume_ml,) = checks.sr_volumes_ml(results["SR"][0])
    voxel_ml = abs(np.linalg.det(source.affine[:3, :3])) / 1000
    assert volume_ml == pytest.approx(seg.sum() * voxel_ml, rel=0.01)

    # The volume and the label map travelled through shared memory: none of it is left.
    assert named_regions(node.proc.pid) == []


def test_results_wait_for_a_pacs_that_is_down_then_arrive_once(node, pacs, tmp_path):
    phantom = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=77)
    attrs = SeriesAttributes(patient_id="E2E-2")
    write_ct_series(phantom.hu, tmp_path / "ct", spacing=phantom.spacing, attrs=attrs)
    pacs.stop()
    try:
        assert storescu(node.port, tmp_path / "ct").returncode == 0

        def waiting(jobs):
            job = next((j for j in jobs if j["series_uid"] == attrs.series_instance_uid), None)
            return bool(
                job
                and job["state"] == "done"
                and job["outbox"]
                and all(o["attempts"] >= 1 and o["state"] == "pending" for o in job["outbox"])
            )

        jobs = node.wait_for(
            waiting, timeout=600, what="failed export attempts", failures_allowed=False
        )
        job = next(j for j in jobs if j["series_uid"] == attrs.series_instance_uid)
        assert all("cannot be reached" in o["last_error"] for o in job["outbox"])
    finally:
        pacs.start()
    node.wait_for(_finished(attrs.series_instance_uid), timeout=120, what="results after restart")
    # Every result is recorded sent, a state nothing leaves: a duplicate could only have
    # gone before that record, after its C-STORE was acknowledged, so it is in the PACS now.
    results = _study_results(pacs, attrs.study_instance_uid, tmp_path / "from-pacs")
    assert {m: len(results.get(m, [])) for m in RESULT_MODALITIES} == {
        m: 1 for m in RESULT_MODALITIES
    }


@pytest.mark.parametrize("name", ["lidc-chest/LIDC-IDRI-0003", "dcmqi-abdomen-3slice"])
def test_real_series_run_through_the_chain(node, pacs, data_dir, tmp_path, name):
    ct_paths = sorted((data_dir / "ct" / name).rglob("*.dcm"))
    first = pydicom.dcmread(ct_paths[0], stop_before_pixels=True)
    assert storescu(node.port, data_dir / "ct" / name).returncode == 0
    node.wait_for(_finished(str(first.SeriesInstanceUID)), timeout=600, what="results")
    results = _study_results(pacs, str(first.StudyInstanceUID), tmp_path / "from-pacs")
    _check_results(results, ct_paths)
    source = assemble_series(ct_paths)
    assert checks.seg_referenced_uids(results["SEG"][0]) <= set(source.source_uids)
    rt = pydicom.dcmread(results["RTSTRUCT"][0])
    listed = {
        str(i.ReferencedSOPInstanceUID)
        for i in rt.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    }
    assert listed == set(source.source_uids)
