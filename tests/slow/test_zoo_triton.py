"""The model zoo's CT bundles through Triton, exactly as MONAI itself runs them (slow: run
beside the suite, not in it, with ``DICOM_NODE_SLOW=1``).

A node serves the three published bundles of ``../shared/zoo`` and a variant laid out
otherwise (:mod:`tests.system.test_zoo_bundles` makes them, with weights drawn from each
bundle's own ``network_def``) on its Triton server; one narrow phantom series is pushed to
it, all four routed for it. The results must reach the PACS valid (``dciodvfy``), and each
SEG read back from the PACS must hold MONAI's own labels for its bundle. SwinUNETR takes some
10 s a window on two cores, the four networks with their references about two minutes: the
suite keeps the in-process comparisons and the demo bundle's run through Triton.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.pipeline import read_bundle_info
from tests import checks
from tests.peers import NodeProcess, Orthanc, managed_triton, pacs_destination, storescu
from tests.system.test_zoo_bundles import (
    ZOO,
    Bundles,
    References,
    _series,
    assert_same_labels,
)

pytestmark = [
    pytest.mark.skipif(not os.environ.get("DICOM_NODE_SLOW"), reason="DICOM_NODE_SLOW unset"),
    pytest.mark.skipif(not ZOO.is_dir(), reason=f"no model-zoo configs at {ZOO}"),
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def narrow_series(tmp_path_factory):
    """144 x 120 x 100 mm: one window per bundle, for the run of all four through Triton (the
    blending is the in-process tests' and test_triton's; SwinUNETR takes ~10 s a window)."""
    return _series(tmp_path_factory.mktemp("zoo-ct-narrow"), 48)


@pytest.fixture(scope="module")
def narrow_references(bundles, narrow_series, tmp_path_factory):
    _, volume, _ = narrow_series
    return References(bundles, volume, tmp_path_factory.mktemp("zoo-reference-narrow"))


#: The bundles the node serves through Triton, and the model name each is served as.
SERVED = {
    "spleen_ct_segmentation": "spleen",
    "swin_unetr_btcv_segmentation": "swin",
    "wholeBody_ct_segmentation": "wholebody",
    "spleen_variant": "variant",
}


@pytest.fixture(scope="module")
def through_triton(bundles, narrow_series, tmp_path_factory):
    """The narrow series pushed to a node serving the four bundles through its Triton server,
    all four routed for it; the result objects as the PACS (Orthanc) holds them.

    ``[[models]]`` give only a name and a bundle: the node writes the Triton models itself.
    The node's own deadlines bound this: Triton's start (300 s) and the wait for results."""
    paths, _, attrs = narrow_series
    tmp = tmp_path_factory.mktemp("zoo-triton")
    pacs = Orthanc(tmp / "pacs").start()
    node = NodeProcess(
        tmp / "node",
        node={"settle_seconds": 1.0},
        inference=managed_triton(startup_timeout_seconds=300),
        models=[{"name": SERVED[n], "bundle": str(bundles[n])} for n in SERVED],
        routes=[{"models": list(SERVED.values())}],
        destinations=[pacs_destination(pacs)],
    )
    try:
        node.start()
        assert storescu(node.port, paths).returncode == 0

        node.wait_for_results_sent(
            attrs.series_instance_uid, timeout=600, what="four result sets in the PACS"
        )
        results = [
            path
            for path in pacs.download_study(attrs.study_instance_uid, tmp)
            if pydicom.dcmread(path, stop_before_pixels=True).Modality != "CT"
        ]
        yield results
    finally:
        node.stop()
        pacs.stop()


def _seg_algorithm(path: Path) -> str | None:
    """The algorithm that made a SEG (``None`` for another object)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SegmentSequence[0].SegmentAlgorithmName) if ds.Modality == "SEG" else None


@pytest.mark.slow
def test_the_four_bundles_results_reach_the_pacs_valid(through_triton):
    modalities = []
    for path in through_triton:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        modalities.append(str(ds.Modality))
        assert checks.dciodvfy_errors(path) == [], (ds.Modality, ds.SeriesDescription)
    assert sorted(modalities) == sorted(["SEG", "RTSTRUCT", "SR"] * len(SERVED))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SERVED))
def test_labels_through_triton_are_monai_s_own(
    name, bundles, through_triton, narrow_series, narrow_references
):
    _, volume, _ = narrow_series
    info = read_bundle_info(bundles[name])
    (path,) = (p for p in through_triton if _seg_algorithm(p) == info.name)
    seg = hd.seg.segread(path)
    by_name = {v: k for k, v in info.labels.items()}
    labels = np.zeros(volume.array.shape, np.uint8)
    for item in seg.SegmentSequence:
        mask = checks.seg_mask(seg, volume, int(item.SegmentNumber))
        labels[mask] = by_name[str(item.SegmentLabel)]
    assert_same_labels(labels, narrow_references[name], f"{name} through Triton")
    if name == "wholeBody_ct_segmentation":
        generic = [
            str(item.SegmentLabel)
            for item in seg.SegmentSequence
            if item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "123037004"
        ]
        assert generic == [], f"segments coded only as Body structure: {generic}"
