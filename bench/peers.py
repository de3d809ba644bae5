"""The node against MONAI Deploy App SDK 4.0 and the plain MONAI way, with a model-zoo bundle.

Bundle: the zoo's ``spleen_ct_segmentation`` as published (``../shared/zoo``: its
inference config, UNet, softmax, trilinear ``Invertd``, argmax), with weights drawn from
its own ``network_def`` after ``torch.manual_seed(0)`` and saved as TorchScript
``models/model.ts``, the file the SDK's bundle operator loads. The node serves the same
folder through the Triton server it starts, so the three run one network.
``BENCH_PEERS_TRAINED=/path/model.ts`` adds rows with trained weights (TorchScript of the
same network; none can be downloaded here).

Series: an abdominal phantom at 512x512 (0.78 mm pixels, 1.5 mm slices), of
``BENCH_PEERS_SLICES`` slices (default 100 and 300), with a Study Description (the SDK's
example selects series by one).

- **MONAI Deploy App SDK 4.0.0** (PyPI ``monai-deploy-app-sdk``, with ``holoscan-cu13``,
  which runs on a CPU), in a virtual environment of its own that this benchmark creates
  under ``var/bench/`` (``torch==2.13.0``, then the SDK, ``numpy<2``, MONAI, pydicom,
  highdicom, nibabel, scikit-image, SimpleITK): the operator chain of its spleen example
  (``bench/appsdk_app.py``), one fresh process per series as its applications run, timed
  from the process's launch to its SEG on disk; and the same application run again in the
  same process (torch and the SDK imported, the network loaded again by the new app).
- **The plain MONAI way**, in this process: pydicom reads and stacks the files, the
  bundle's own preprocessing, inferer and postprocessing as ``ConfigParser`` builds them,
  a highdicom binary SEG on disk.
- **This project**: ``dicom-node serve`` (Triton backend), pushed to with ``storescu``,
  from the last C-STORE response to the PACS (Orthanc) acknowledging SEG, RTSTRUCT and SR;
  each size once untimed first (first allocations of that size), then timed.

The labels are compared: each SEG read back with highdicom on the CT's grid, the Dice of
the node's spleen with the SDK's and with the plain way's. Medians of ``BENCH_PEERS_RUNS``
(default 1) runs; never asserts a time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from bench.e2e import _latency
from bench.multiorgan import PlainMonai
from dicom_node.config import PROJECT_ROOT
from dicom_node.pipeline import load_bundle
from dicom_node.pipeline.install import write_seeded_weights
from dicom_node.series.volume import assemble_series
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series

SLICES = [int(v) for v in os.environ.get("BENCH_PEERS_SLICES", "100,300").split(",") if v]
RUNS = int(os.environ.get("BENCH_PEERS_RUNS", "1"))
TRAINED = os.environ.get("BENCH_PEERS_TRAINED", "")
SDK_VERSION = "4.0.0"
SDK_VENV = PROJECT_ROOT / "var" / "bench" / f"appsdk-{SDK_VERSION}"
SDK_PACKAGES = [
    f"monai-deploy-app-sdk=={SDK_VERSION}",
    "numpy<2",
    "monai",
    "pydicom",
    "highdicom",
    "nibabel",
    "scikit-image",
    "SimpleITK",
]
APP = Path(__file__).resolve().parent / "appsdk_app.py"
SPACING = (1.5, 0.78125, 0.78125)
TESTDATA = Path(os.environ.get("DICOM_NODE_TESTDATA", PROJECT_ROOT.parent / "shared" / "data"))
ZOO = TESTDATA.parent / "zoo" / "spleen_ct_segmentation"


def _info(text: str) -> dict:
    return {"figure": text, "this_project": None, "peer": None, "ratio": None}


def sdk_python() -> Path:
    """The App SDK's interpreter, its virtual environment made first if there is none."""
    python = SDK_VENV / "bin" / "python"
    if python.is_file():
        return python
    SDK_VENV.parent.mkdir(parents=True, exist_ok=True)
    log = SDK_VENV.parent / f"appsdk-{SDK_VERSION}-install.log"
    with log.open("w") as out:
        for command in (
            [sys.executable, "-m", "venv", str(SDK_VENV)],
            [str(python), "-m", "pip", "install", "torch==2.13.0"],
            [str(python), "-m", "pip", "install", "torch==2.13.0", *SDK_PACKAGES],
        ):
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
                shutil.rmtree(SDK_VENV, ignore_errors=True)
                raise RuntimeError(f"installing the App SDK failed: see {log}")
    return python


def zoo_bundle(dest: Path, trained: str = "") -> Path:
    """The published spleen bundle with TorchScript weights: seeded, or ``trained``."""
    root = dest / ("spleen-trained" if trained else "spleen-seeded")
    shutil.copytree(ZOO / "configs", root / "configs")
    (root / "models").mkdir()
    if trained:
        shutil.copy(trained, root / "models" / "model.ts")
        return root
    weights = write_seeded_weights(root)  # models/model.pt, from network_def and seed 0
    network = load_bundle(root).build_network()
    network.load_state_dict(torch.load(weights, weights_only=True))
    torch.jit.script(network.eval()).save(str(root / "models" / "model.ts"))
    weights.unlink()  # one file of weights for all three: the TorchScript
    return root


def write_series(root: Path, slices: int, seed: int) -> tuple[Path, SeriesAttributes]:
    """A phantom series with new UIDs and a Study Description."""
    phantom = make_phantom(shape=(slices, 512, 512), spacing=SPACING, seed=slices)
    attrs = SeriesAttributes(patient_id=f"BENCH-PEERS-{seed}")
    folder = root / f"ct-{slices}-{seed}"
    for path in write_ct_series(phantom.hu, folder, spacing=phantom.spacing, attrs=attrs):
        ds = pydicom.dcmread(path)
        ds.StudyDescription = "Bench abdomen"
        ds.save_as(path)
    return folder, attrs


def run_sdk(python: Path, folder: Path, bundle: Path, out: Path) -> tuple[float, float, Path]:
    """The SDK's application on ``folder`` in a fresh process, twice: (launch to the first
    SEG, the second run in the same process, the first SEG's path)."""
    cwd = out / "cwd"  # no models/ here: the SDK's default model path
    cwd.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH="")
    t0 = time.time()
    done = subprocess.run(
        [str(python), str(APP), "-i", str(folder), "-o", str(out), "-m", str(bundle)]
        + ["--runs", "2", "--t0", repr(t0)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or len(lines) != 2 or not lines[0]["seg"]:
        raise RuntimeError(f"the App SDK's application failed: {done.stderr[-2000:]}")
    return lines[0]["since_launch"], lines[1]["seconds"], Path(lines[0]["seg"][0])


def spleen_mask(seg_path: Path, source) -> np.ndarray:
    """The SEG's one segment on the CT's grid."""
    from tests import checks

    return checks.seg_mask(seg_path, source, 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def node_seg(pacs, attrs: SeriesAttributes, dest: Path) -> Path:
    """The node's SEG of the series, as the PACS holds it."""
    query = {"StudyInstanceUID": attrs.study_instance_uid}
    found = pacs.rest("/tools/find", {"Level": "Instance", "Expand": True, "Query": query})
    for instance in found:
        data = pacs.file(instance["ID"])
        path = dest / f"{instance['ID']}.dcm"
        path.write_bytes(data)
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SEG":
            return path
    raise RuntimeError("the PACS holds no SEG of the series")


def size_rows(
    label: str, slices: int, node, pacs, python: Path, bundle: Path, plain: PlainMonai, tmp: Path
) -> list[dict]:
    folder, attrs = write_series(tmp, slices, seed=10 * slices + 9)
    _latency(node, folder, attrs)  # first allocations of this size, not timed
    shutil.rmtree(folder)
    mine, stages, cold, warm, plain_s, agree = [], [], [], [], [], []
    for run in range(RUNS):
        folder, attrs = write_series(tmp, slices, seed=10 * slices + run)
        latency, timings = _latency(node, folder, attrs)
        mine.append(latency)
        stages.append(timings)
        first, second, sdk_seg = run_sdk(python, folder, bundle, tmp / f"sdk-{slices}-{run}")
        cold.append(first)
        warm.append(second)
        plain_seg = tmp / f"plain-{slices}-{run}.dcm"
        plain_s.append(plain(folder, plain_seg))
        source = assemble_series(sorted(folder.iterdir()))
        ours = spleen_mask(node_seg(pacs, attrs, tmp), source)
        agree.append(
            (
                dice(ours, spleen_mask(sdk_seg, source)),
                dice(ours, spleen_mask(plain_seg, source)),
                int(ours.sum()),
            )
        )
        shutil.rmtree(folder)
    m = statistics.median(mine)
    c, w, p = statistics.median(cold), statistics.median(warm), statistics.median(plain_s)
    grid = f"512x512x{slices}"
    keys = ("completion", "assemble", "transfer", "pre", "inference", "post", "encode")
    split = {k: round(statistics.median(s.get(k, 0.0) for s in stages), 2) for k in keys}
    split["write"] = round(statistics.median(s.get("write", 0.0) for s in stages), 2)
    split["export"] = round(statistics.median(s.get("export", 0.0) for s in stages), 2)
    sdk_dice = min(a for a, _, _ in agree)
    plain_dice = min(b for _, b, _ in agree)
    return [
        {
            "figure": f"peers {grid}, zoo spleen_ct_segmentation ({label}): node, last C-STORE "
            "response to PACS ack of SEG + RTSTRUCT + SR, s (peer: MONAI Deploy App SDK "
            f"{SDK_VERSION}, its example's operators, a fresh process per series, to its SEG; "
            "target <= 0.3)",
            "this_project": round(m, 2),
            "peer": round(c, 2),
            "ratio": round(m / c, 2),
        },
        {
            "figure": f"peers {grid} ({label}): node (peer: App SDK {SDK_VERSION} app run again "
            "in the same process, imports done)",
            "this_project": round(m, 2),
            "peer": round(w, 2),
            "ratio": round(m / w, 2),
        },
        {
            "figure": f"peers {grid} ({label}): node (peer: the plain MONAI way with the "
            "bundle's own transforms, in-process, to a SEG)",
            "this_project": round(m, 2),
            "peer": round(p, 2),
            "ratio": round(m / p, 2),
        },
        _info(
            f"peers {grid} ({label}) node stages (s): "
            + ", ".join(f"{k} {v}" for k, v in split.items())
        ),  # fmt: skip
        _info(
            f"peers {grid} ({label}) labels: Dice of the node's spleen with the App SDK's "
            f"{sdk_dice:.4f}, with the plain way's {plain_dice:.4f} (node: "
            f"{min(n for _, _, n in agree)} voxels)"
        ),
    ]


def run() -> list[dict]:
    from tests.peers import NodeProcess, Orthanc, free_port

    if not (ZOO / "configs" / "inference.json").is_file():
        return [_info(f"peers: left out, no spleen_ct_segmentation configs at {ZOO}")]
    try:
        python = sdk_python()
    except (OSError, RuntimeError) as exc:
        return [_info(f"peers: left out, the App SDK could not be installed ({exc})")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        bundles = {"seeded weights": zoo_bundle(tmp)}
        if TRAINED:
            bundles["trained weights"] = zoo_bundle(tmp, TRAINED)
        for label, bundle in bundles.items():
            pacs = Orthanc(tmp / f"pacs-{len(rows)}").start()
            node = NodeProcess(
                tmp / f"node-{len(rows)}",
                node={"settle_seconds": 10.0},
                inference={
                    "backend": "triton",
                    "grpc_port": free_port(),
                    "http_port": free_port(),
                    "metrics_port": free_port(),
                    "startup_timeout_seconds": 600,
                },
                models=[{"name": "spleen", "bundle": str(bundle)}],
                routes=[{"models": ["spleen"]}],
                destinations=[
                    {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                     "port": pacs.dicom_port}
                ],
            )  # fmt: skip
            plain = PlainMonai(bundle, ["spleen"])
            try:
                node.start(timeout=600)
                folder, attrs = write_series(tmp, 40, seed=1)
                _latency(node, folder, attrs)  # the first job loads the models
                for slices in SLICES:
                    rows += size_rows(label, slices, node, pacs, python, bundle, plain, tmp)
            finally:
                node.stop()
                pacs.stop()
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
