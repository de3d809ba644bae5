"""End to end: from the last C-STORE response of a CT series to the PACS's acknowledgement
of its SEG, RTSTRUCT and SR, split by stage.

This project: ``dicom-node serve`` with its default completion rules (complete when
``storescu`` releases its association, the 10 s settle timer only as the fallback; nothing
is subtracted) and the Triton server it starts, pushed to with DCMTK ``storescu``, sending
to Orthanc. The stages: "completion" (last instance to the job's start), then assemble,
transfer, pre, inference, post, encode, write and export (results queued to acknowledged). Peer, in the same run with the same demo network: the plain
approach of the MONAI tutorials and MONAI Deploy apps: read the files with pydicom, stack the
slices, MONAI dictionary transforms on numpy on the CPU, ``sliding_window_inference``,
post-processing with dictionary transforms and Invertd, then a highdicom SEG.

Each size is run once untimed first (first-time allocations of that size), then
``BENCH_E2E_RUNS`` times (default 3) alternating with the peer; medians are printed.

Also printed: 100/200/400 slices (linear growth), the node's peak RSS for a 300-slice series
against the volume's INT16 size (target <= 3x), and series per minute with 1, 2 and 4
series pushed at once, with Triton's dynamic batching on and off.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import (
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    Invertd,
    KeepLargestConnectedComponentd,
    LabelToContourd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from dicom_node.config import PROJECT_ROOT
from dicom_node.encode import AlgorithmInfo, segment_info_for
from dicom_node.pipeline import load_bundle
from dicom_node.pipeline.transforms import ras_affine
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, Orthanc, free_port

RUNS = int(os.environ.get("BENCH_E2E_RUNS", "3"))  # 3 x (node + plain) per size, medians
SETTLE = 10.0  # the default: with completion at release, never waited for here
BUNDLE = PROJECT_ROOT / "bundles" / "spleen_ct_demo"
SIZES = [int(v) for v in os.environ.get("BENCH_E2E_SLICES", "100,200,400").split(",") if v]
MEMORY_SLICES = int(os.environ.get("BENCH_MEMORY_SLICES", "300"))
CONCURRENCY = [int(v) for v in os.environ.get("BENCH_THROUGHPUT", "1,2,4").split(",") if v]


@functools.lru_cache(maxsize=2)
def _phantom_hu(slices: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One phantom per size (painting 100 slices takes ~17 s here): runs of a size differ in
    their UIDs, which is all the node tells series apart by."""
    ph = make_phantom(shape=(slices, 512, 512), spacing=(400.0 / slices, 0.7, 0.7), seed=slices)
    return ph.hu, ph.spacing


def _write_series(root: Path, slices: int, seed: int) -> tuple[Path, SeriesAttributes]:
    hu, spacing = _phantom_hu(slices)
    attrs = SeriesAttributes(patient_id=f"BENCH-{seed}")  # new study, series and SOP UIDs
    folder = root / f"s{slices}-{seed}"
    write_ct_series(hu, folder, spacing=spacing, attrs=attrs)
    return folder, attrs


def read_series_plainly(folder: Path) -> tuple[list, np.ndarray, np.ndarray]:
    """What the tutorials do: read every file with pydicom, sort by z, stack the slices in
    Hounsfield units as float32; the (slice, row, column) -> LPS affine of an axial series."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    ).astype(np.float32)
    first = datasets[0]
    dz = float(datasets[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, dz)
    affine[:3, 1] = (0, float(first.PixelSpacing[0]), 0)
    affine[:3, 2] = (float(first.PixelSpacing[1]), 0, 0)
    affine[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    return datasets, hu, affine


def plain(folder: Path) -> float:
    """The plain approach, timed from reading the files to a SEG on disk."""
    bundle = load_bundle(BUNDLE)
    pre = bundle.preprocessing
    net = bundle.load_network("cpu")
    t0 = time.perf_counter()
    datasets, hu, affine = read_series_plainly(folder)
    image = MetaTensor(torch.as_tensor(hu), affine=torch.as_tensor(ras_affine(affine)))
    transforms = Compose(
        [
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            Orientationd("image", axcodes=pre.axcodes),
            Spacingd("image", pixdim=pre.pixdim, mode="bilinear"),
            ScaleIntensityRanged(
                "image",
                a_min=pre.a_min,
                a_max=pre.a_max,
                b_min=pre.b_min,
                b_max=pre.b_max,
                clip=True,
            ),
        ]
    )
    data = transforms({"image": image})
    with torch.no_grad():
        data["pred"] = sliding_window_inference(
            data["image"][None], bundle.roi_size, bundle.sw_batch_size, net, overlap=bundle.overlap
        )[0]
    data = Compose(
        [
            AsDiscreted("pred", argmax=True),
            KeepLargestConnectedComponentd("pred", applied_labels=[1]),
            Invertd("pred", transform=transforms, orig_keys="image", nearest_interp=True),
            CopyItemsd("pred", names="contour"),
            LabelToContourd("contour"),
        ]
    )(data)
    # Invertd restores the input's own axes: (slice, row, column) of the sorted files
    mask = np.asarray(data["pred"][0]).astype(bool)
    info = segment_info_for(1, "spleen")
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="spleen",
                segmented_property_category=info.category,
                segmented_property_type=info.code,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="plain", version="1", family=AlgorithmInfo("p", "1").family
                ),
            )
        ],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="bench",
        manufacturer_model_name="plain",
        software_versions="1",
        device_serial_number="1",
        omit_empty_frames=True,
    )
    seg.save_as(folder.parent / f"{folder.name}-plain-seg.dcm")
    return time.perf_counter() - t0


def _node(root: Path, pacs: Orthanc, repository: Path | None = None) -> NodeProcess:
    inference = {
        "backend": "triton",
        "grpc_port": free_port(),
        "http_port": free_port(),
        "metrics_port": free_port(),
        "max_concurrent_jobs": 4,
    }
    if repository is not None:
        inference["model_repository"] = str(repository)
    return NodeProcess(
        root,
        node={"settle_seconds": SETTLE},
        inference=inference,
        destinations=[
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    ).start(timeout=120)


def _push(node: NodeProcess, folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-aec", "DICOM_NODE", "+sd", "+r", "127.0.0.1", str(node.port), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_sent(node: NodeProcess, uids: set[str], timeout: float = 900) -> dict[str, dict]:
    def done(jobs: list[dict]) -> bool:
        finished = {
            j["series_uid"]
            for j in jobs
            if j["state"] == "done"
            and j["outbox"]
            and all(o["state"] == "sent" for o in j["outbox"])
        }
        return uids <= finished

    jobs = node.wait_for(done, timeout, "results in the PACS", failures_allowed=False)
    return {j["series_uid"]: j for j in jobs if j["series_uid"] in uids}


def _sent_at(node: NodeProcess, uid: str) -> float:
    from dicom_node.state import JobDatabase

    store = JobDatabase(node.data_dir / "jobs.sqlite")
    try:
        return max(o.sent_at or 0.0 for o in store.outbox.items(uid))
    finally:
        store.close()


def _latency(node: NodeProcess, folder: Path, attrs: SeriesAttributes) -> tuple[float, dict]:
    p = _push(node, folder)
    if p.wait(600) != 0:
        raise RuntimeError("storescu failed")
    job = _wait_sent(node, {attrs.series_instance_uid})[attrs.series_instance_uid]
    sent_at = _sent_at(node, attrs.series_instance_uid)
    latency = sent_at - job["last_received"]
    # "updated" is when the job became done: its results were on disk and queued
    return latency, dict(
        job["timings"], export=sent_at - job["updated"], completed_by=job["completed_by"]
    )


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(re.findall(r"\d+", line)[0]) / 1024
    return float("nan")


def _unbatched_repository(root: Path) -> Path:
    repo = root / "repository-no-batching"
    shutil.copytree(
        PROJECT_ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__")
    )
    for config in repo.glob("*_unet/config.pbtxt"):
        text = config.read_text()
        text = re.sub(r"dynamic_batching \{[^}]*\}\n", "", text)
        config.write_text(text)
    # the models find their bundles relative to the repository: point them at the project's
    for config in repo.glob("*/config.pbtxt"):
        config.write_text(config.read_text().replace('"../bundles/', f'"{PROJECT_ROOT}/bundles/'))
    return repo


def run() -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        pacs = Orthanc(root / "pacs").start()
        try:
            node = _node(root / "node", pacs)
            try:
                warm, wattrs = _write_series(root, 40, seed=1)  # first job loads the models
                _latency(node, warm, wattrs)
                latencies: dict[int, float] = {}
                for slices in SIZES:
                    mine, peer, stages = [], [], []
                    # A series of a size the node has not seen yet also pays for first-time
                    # allocations of that size (shared-memory regions, the Triton model's
                    # buffers): one run at each size first, not timed, as a node in service
                    # has long since made them.
                    folder, attrs = _write_series(root, slices, seed=10 * slices + 9)
                    _latency(node, folder, attrs)
                    shutil.rmtree(folder)
                    for run_ in range(RUNS):
                        folder, attrs = _write_series(root, slices, seed=10 * slices + run_)
                        latency, timings = _latency(node, folder, attrs)
                        mine.append(latency)
                        stages.append(timings)
                        peer.append(plain(folder))
                        shutil.rmtree(folder)
                    m, p = statistics.median(mine), statistics.median(peer)
                    latencies[slices] = m
                    rows.append(
                        {
                            "figure": f"e2e 512x512x{slices}: last C-STORE response to "
                            "PACS ack of SEG + RTSTRUCT + SR, s (peer: plain "
                            "MONAI way to a SEG)",
                            "this_project": round(m, 2),
                            "peer": round(p, 2),
                            "ratio": round(m / p, 2),
                        }
                    )
                    split = {
                        k: round(statistics.median(s.get(k, 0.0) for s in stages), 3)
                        for k in (
                            "completion",
                            "assemble",
                            "transfer",
                            "pre",
                            "inference",
                            "post",
                            "encode",
                            "write",
                            "export",
                        )
                    }
                    rules = sorted({s["completed_by"] for s in stages})
                    rows.append(
                        {
                            "figure": f"e2e 512x512x{slices} stages (s): "
                            + ", ".join(f"{k} {v}" for k, v in split.items())
                            + f"; completed by: "
                            f"{', '.join(rules)}",
                            "this_project": None,
                            "peer": None,
                            "ratio": None,
                        }
                    )
                if len(latencies) > 1:
                    lo, hi = min(latencies), max(latencies)
                    rows.append(
                        {
                            "figure": f"e2e growth {lo}->{hi} slices (linear = {hi / lo:.1f})",
                            "this_project": round(latencies[hi] / latencies[lo], 2),
                            "peer": hi / lo,
                            "ratio": None,
                        }
                    )
                rows += _throughput(node, root, "on")
            finally:
                node.stop()
            # memory in a fresh node process: its peak then belongs to this one series
            node = _node(root / "node-mem", pacs)
            try:
                folder, attrs = _write_series(root, MEMORY_SLICES, seed=7)
                _latency(node, folder, attrs)
                rss = _peak_rss_mb(node.proc.pid)
                volume_mb = MEMORY_SLICES * 512 * 512 * 2 / 2**20
                rows.append(
                    {
                        "figure": f"peak RSS of the node, 512x512x{MEMORY_SLICES} end to "
                        "end, MB (peer: the volume's INT16 size; target <= 3x)",
                        "this_project": round(rss, 0),
                        "peer": round(volume_mb, 0),
                        "ratio": round(rss / volume_mb, 2),
                    }
                )
            finally:
                node.stop()
            node = _node(root / "node-nb", pacs, _unbatched_repository(root))
            try:
                warm, wattrs = _write_series(root, 40, seed=2)  # loads its models first
                _latency(node, warm, wattrs)
                rows += _throughput(node, root, "off")
            finally:
                node.stop()
        finally:
            pacs.stop()
    return rows


def _throughput(node: NodeProcess, root: Path, batching: str) -> list[dict]:
    rows = []
    for n in CONCURRENCY:
        series = [_write_series(root, 100, seed=1000 + 10 * n + i) for i in range(n)]
        t0 = time.time()
        pushes = [_push(node, folder) for folder, _ in series]
        for p in pushes:
            p.wait(600)
        _wait_sent(node, {a.series_instance_uid for _, a in series})
        minutes = (time.time() - t0) / 60
        rows.append(
            {
                "figure": f"throughput, {n} x 512x512x100 pushed at once, dynamic batching "
                f"{batching}: series/min",
                "this_project": round(n / minutes, 2),
                "peer": None,
                "ratio": None,
            }
        )
        for folder, _ in series:
            shutil.rmtree(folder)
    return rows


def main() -> None:
    for row in run():
        print(row)


if __name__ == "__main__":
    sys.exit(main())
