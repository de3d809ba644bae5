"""The MONAI Deploy App SDK's standard application, run by ``bench/peers.py`` in the SDK's
own virtual environment (it imports ``monai.deploy``, which the node's does not have).

The operator chain of the SDK's spleen example (``examples/apps/ai_spleen_seg_app``):
DICOMDataLoader -> DICOMSeriesSelector (its sample rules) -> DICOMSeriesToVolume ->
MonaiBundleInferenceOperator (the bundle's own pre- and post-processing and inferer) ->
DICOMSegmentationWriter; the example's optional STL conversion is left out. One
application run per series, as the SDK's applications run (``monai-deploy exec``, a
container per job).

    python bench/appsdk_app.py -i DICOM_DIR -o OUT_DIR -m BUNDLE_DIR [--runs N] [--t0 EPOCH]

With ``--runs 2`` the same series runs twice in this process, the second time with torch,
MONAI and the SDK imported (the bundle operator loads the network again: each run is a new
application). One JSON line per run on stdout: its start and end (epoch seconds) and where
its SEG went; with ``--t0`` (when the process was launched) the first also says how long
the process took from its launch to that SEG.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.core.domain import Image
from monai.deploy.core.io_type import IOType
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import (
    DICOMSegmentationWriterOperator,
    SegmentDescription,
)
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from pydicom.sr.codedict import codes

#: The example's series selection rules, as published.
RULES = """
{
    "selections": [
        {
            "name": "CT Series",
            "conditions": {
                "StudyDescription": "(.*?)",
                "Modality": "(?i)CT",
                "SeriesDescription": "(.*?)"
            }
        }
    ]
}
"""


class SpleenSegApp(Application):
    """The example's application, with the input, output and bundle given explicitly."""

    def __init__(self, input_dir: Path, output_dir: Path, bundle: Path) -> None:
        self.input_dir, self.output_dir, self.bundle = input_dir, output_dir, bundle
        super().__init__()

    def compose(self) -> None:
        # No model path: the SDK's model factory would wrap the bundle folder as a model
        # without a predictor; the bundle operator loads a folder bundle's network itself
        # (models/model.ts) from ``bundle_path``. (Run from a folder without "models/", the
        # SDK's default model path.)
        context = AppContext({"input": str(self.input_dir), "output": str(self.output_dir)})
        loader = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=self.input_dir, name="study_loader_op"
        )
        selector = DICOMSeriesSelectorOperator(self, rules=RULES, name="series_selector_op")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_vol_op")
        inference = MonaiBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=context,
            bundle_path=self.bundle,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="bundle_spleen_seg_op",
        )
        writer = DICOMSegmentationWriterOperator(
            self,
            segment_descriptions=[
                SegmentDescription(
                    segment_label="Spleen",
                    segmented_property_category=codes.SCT.Organ,
                    segmented_property_type=codes.SCT.Spleen,
                    algorithm_name="volumetric (3D) segmentation of the spleen from CT image",
                    algorithm_family=codes.DCM.ArtificialIntelligence,
                    algorithm_version="0.3.2",
                )
            ],
            custom_tags={"SeriesDescription": "AI generated Seg, not for clinical use."},
            output_folder=self.output_dir,
            name="dicom_seg_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(
            selector, to_volume, {("study_selected_series_list", "study_selected_series_list")}
        )
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(
            selector, writer, {("study_selected_series_list", "study_selected_series_list")}
        )
        self.add_flow(inference, writer, {("pred", "seg_image")})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("-m", "--model", type=Path, required=True, help="the bundle folder")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--t0", type=float, default=None, help="when the process was launched")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for run in range(1, args.runs + 1):
        out = args.output / f"run{run}"
        out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        SpleenSegApp(args.input, out, args.model).run()
        end = time.time()
        line = {"run": run, "start": start, "end": end, "seconds": end - start}
        line["seg"] = [str(p) for p in sorted(out.rglob("*.dcm"))]
        if run == 1 and args.t0 is not None:
            line["since_launch"] = end - args.t0
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
