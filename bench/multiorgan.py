"""104 labels: the results of a whole-body model at 512x512x300, and end to end.

Encode. The label map holds the 104 classes of the MONAI model zoo's
``wholeBody_ct_segmentation`` (the TotalSegmentator classes), each drawn as one blob of
roughly its adult size (liver 1.6 L, lung lobes, 24 vertebrae, 24 ribs, adrenal glands of
5 mL...): an ellipsoid of the organ's volume and proportions whose surface is bent by
smooth noise, painted largest first inside a 400 x 400 x 450 mm field of view, so that
every label is one compact, irregular shape as a trained model draws it. A network with
random weights would instead speckle every label over every slice, which no real model
does and which would measure the speckle rather than the encoders. On a 512x512x300 CT
(0.78 mm pixels, 1.5 mm slices) it is encoded as every SEG the node writes (binary native;
label map native, RLE Lossless and JPEG-LS Lossless; highdicom writes binary 1-bit frames
only natively or as JPEG 2000, which the node does not offer), as an RTSTRUCT (default
contour cap) and as a TID 1500 SR. Each row gives the object's size in MB and its encode
time (build + write) in s; the peer is the binary SEG, the default.

End to end. The zoo's wholeBody bundle with weights drawn from its own ``network_def``
(``torch.manual_seed(0)``), in the bundle's own low-resolution configuration
(``displayable_configs#highres = false``: 3 mm grid, which its authors provide for
machines with little memory), on a phantom series of ``BENCH_MULTIORGAN_E2E_SHAPE``
(default 96x192x192 at 1.5 x 0.78 x 0.78 mm, a 150 x 150 x 144 mm field). Why reduced:
at 512x512x300 and the full 1.5 mm grid the bundle's sliding window keeps 105 channels
of float logits over 267x267x300 voxels (9 GB, and as much again for the softmax) and
runs 64 windows of ~2.5 s each on two cores, per side; and seeded weights speckle every
label over every slice, so a full-size SEG and RTSTRUCT of that speckle would be hundreds
of MB that no trained model writes. This project: ``dicom-node serve`` with the Triton
server it starts (``BENCH_MULTIORGAN_BACKEND=local`` for the in-process backend), last
C-STORE response to the PACS (Orthanc) acknowledging SEG + RTSTRUCT + SR. Peer: the plain
MONAI way, in the same run: pydicom reads and stacks the files, the bundle's own
preprocessing, inferer and postprocessing as :class:`monai.bundle.ConfigParser` builds
them, then a highdicom binary SEG on disk. ``BENCH_MULTIORGAN_E2E=0`` leaves it out; it is
also left out, saying why, where the zoo configs are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import scipy.ndimage as ndi
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged

from bench.e2e import read_series_plainly
from bench.encode import _encode, _rows, _series
from dicom_node.config import ResultSettings, settings_from_dict
from dicom_node.encode import (
    AlgorithmInfo,
    EncodeContext,
    build_rtstruct,
    build_seg,
    build_sr,
    encoders,
    segment_info_for,
)
from dicom_node.encode.processes import EncodeRequest, EncoderProcesses, encode_in_process
from dicom_node.pipeline.install import write_seeded_weights
from dicom_node.pipeline.transforms import ras_affine
from dicom_node.series.volume import SeriesVolume


def _shape(name: str, default: str) -> tuple[int, int, int]:
    slices, rows, cols = (int(v) for v in os.environ.get(name, default).split(","))
    return slices, rows, cols


RUNS = int(os.environ.get("BENCH_RUNS", "1"))
E2E_RUNS = int(os.environ.get("BENCH_MULTIORGAN_E2E_RUNS", "2"))
SHAPE = _shape("BENCH_MULTIORGAN_SHAPE", "300,512,512")
E2E_SHAPE = _shape("BENCH_MULTIORGAN_E2E_SHAPE", "96,192,192")
E2E = os.environ.get("BENCH_MULTIORGAN_E2E", "1") != "0"
BACKEND = os.environ.get("BENCH_MULTIORGAN_BACKEND", "triton")
#: The field of view of the encode case (slice, row, column mm): 512x512x300 at 1.5 x
#: 0.78125 x 0.78125 mm. A smaller grid keeps the field and gets coarser voxels.
FIELD_MM = (450.0, 400.0, 400.0)
E2E_SPACING = (1.5, 0.78125, 0.78125)
ALGORITHM = AlgorithmInfo("wholeBody_ct_segmentation", "0.2.0")
ZOO = Path(os.environ.get("DICOM_NODE_TESTDATA", Path(__file__).parents[2] / "shared" / "data"))
ZOO = ZOO.parent / "zoo" / "wholeBody_ct_segmentation"
SEG_FORMATS = [("labelmap", "none"), ("labelmap", "rle"), ("labelmap", "jpegls")]

_SIDES = ("left", "right")
#: The bundle's 104 labels (metadata.json's channel_def 1..104), in its order.
WHOLEBODY_LABELS: list[str] = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right",
    *(f"vertebrae_L{i}" for i in range(5, 0, -1)), *(f"vertebrae_T{i}" for i in range(12, 0, -1)),
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)), "esophagus", "trachea", "heart_myocardium",
    "heart_atrium_left", "heart_ventricle_left", "heart_atrium_right", "heart_ventricle_right",
    "pulmonary_artery", "brain", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "small_bowel", "duodenum", "colon",
    *(f"rib_{side}_{i}" for side in _SIDES for i in range(1, 13)),
    "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
    "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left",
    "autochthon_right", "iliopsoas_left", "iliopsoas_right", "urinary_bladder",
]  # fmt: skip

#: Adult volume (mL) and proportions (slice, row, column axes) by name prefix: rough
#: figures of the kind TotalSegmentator reports, enough to give the blobs realistic sizes.
_ORGAN_SIZES: list[tuple[str, float, tuple[float, float, float]]] = [
    ("liver", 1600, (1.0, 1.1, 1.4)), ("brain", 1300, (0.9, 1.2, 1.0)),
    ("lung_middle", 400, (0.8, 1.0, 1.0)), ("lung", 900, (1.6, 1.2, 0.8)),
    ("small_bowel", 700, (1.0, 1.0, 1.2)), ("colon", 600, (1.2, 1.0, 1.4)),
    ("gluteus_maximus", 700, (1.4, 1.0, 0.9)), ("gluteus_medius", 350, (1.2, 1.0, 0.8)),
    ("gluteus_minimus", 100, (1.0, 0.8, 0.6)), ("autochthon", 400, (5.0, 0.8, 0.6)),
    ("iliopsoas", 300, (3.0, 0.8, 0.8)), ("femur", 400, (4.0, 0.6, 0.6)),
    ("hip", 400, (1.2, 1.0, 0.5)), ("humerus", 200, (4.0, 0.6, 0.6)),
    ("scapula", 120, (1.3, 1.2, 0.3)), ("clavicula", 25, (0.4, 0.4, 3.0)),
    ("sacrum", 200, (1.2, 0.8, 1.1)), ("face", 300, (1.0, 0.6, 1.2)),
    ("heart_myocardium", 150, (1.0, 1.0, 1.0)), ("heart", 100, (1.0, 1.0, 1.0)),
    ("pulmonary_artery", 60, (0.8, 1.0, 1.6)), ("aorta", 150, (6.0, 0.7, 0.7)),
    ("inferior_vena_cava", 100, (5.0, 0.8, 0.7)), ("esophagus", 25, (8.0, 0.6, 0.8)),
    ("trachea", 30, (5.0, 1.0, 1.0)), ("iliac_artery", 15, (4.0, 0.7, 0.7)),
    ("iliac_vena", 25, (4.0, 0.8, 0.8)), ("portal_vein", 20, (1.0, 0.8, 2.5)),
    ("spleen", 200, (1.2, 1.0, 0.8)), ("kidney", 150, (1.5, 0.9, 0.8)),
    ("gallbladder", 30, (1.4, 1.0, 1.0)), ("stomach", 300, (1.2, 0.9, 1.3)),
    ("pancreas", 80, (0.6, 0.7, 2.5)), ("adrenal", 5, (1.5, 0.5, 1.0)),
    ("duodenum", 80, (1.5, 0.8, 1.0)), ("urinary_bladder", 200, (0.9, 1.0, 1.2)),
    ("vertebrae_L", 40, (0.7, 1.0, 1.1)), ("vertebrae_T", 25, (0.7, 1.0, 1.1)),
    ("vertebrae_C", 8, (0.6, 1.0, 1.2)), ("rib", 15, (0.3, 1.2, 5.0)),
]  # fmt: skip


def organ_size(name: str) -> tuple[float, tuple[float, float, float]]:
    """Volume (mL) and axis proportions of the blob standing for organ ``name``."""
    for prefix, volume, axes in _ORGAN_SIZES:
        if name.startswith(prefix):
            return volume, axes
    raise KeyError(name)


def wholebody_labels(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0
) -> np.ndarray:
    """A (slices, rows, columns) uint8 map of the 104 wholeBody classes as organ blobs.

    Sizes are scaled with the field of view against the 400 x 400 x 450 mm the sizes are
    for, so a small test grid still holds all 104 (each at least one voxel across).
    Painted largest first, so that a small organ is never hidden under a large one.
    """
    rng = np.random.default_rng(seed)
    field = np.array(shape) * np.array(spacing)
    scale = float(np.cbrt(np.prod(field / np.array(FIELD_MM))))
    labels = np.zeros(shape, dtype=np.uint8)
    order = sorted(range(len(WHOLEBODY_LABELS)), key=lambda i: -organ_size(WHOLEBODY_LABELS[i])[0])
    for index in order:
        volume_ml, axes = organ_size(WHOLEBODY_LABELS[index])
        # semi-axes (mm) of an ellipsoid of that volume: 4/3 pi abc = V
        unit = np.cbrt(volume_ml * 1000 / (4 / 3 * np.pi * np.prod(axes))) * scale
        radii = np.maximum(np.array(axes) * unit / np.array(spacing), 1.0)  # voxels
        half = np.ceil(radii * 1.3).astype(int)
        # centres inside a body ellipse of 70% of the field in-plane
        centre = np.array(
            [
                rng.uniform(half[0], max(half[0] + 1, shape[0] - half[0])),
                shape[1] / 2 + rng.uniform(-0.35, 0.35) * shape[1],
                shape[2] / 2 + rng.uniform(-0.35, 0.35) * shape[2],
            ]
        ).astype(int)
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, shape)
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
        # a smooth field bends the surface by up to ~20%: irregular, yet one compact blob
        bend = ndi.gaussian_filter(rng.standard_normal(distance.shape), sigma=max(radii) / 3)
        bend *= 0.2 / max(float(np.abs(bend).max()), 1e-9)
        region = labels[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        region[distance <= (1 + bend) ** 2] = index + 1
        if not (region == index + 1).any():  # smaller than a voxel: keep its centre
            labels[tuple(np.clip(centre, 0, np.array(shape) - 1))] = index + 1
    return labels


def _info_row(text: str) -> dict:
    return {"figure": text, "this_project": None, "peer": None, "ratio": None}


def encode_rows(
    tmp: Path,
    shape: tuple[int, int, int] = SHAPE,
    runs: int = max(3, RUNS),
    ingest: bool = True,
) -> list[dict]:
    """SEG in every format, RTSTRUCT and SR of the 104 organ blobs on ``shape``; the three
    together as the node makes them, median of ``runs``; and, with ``ingest``, a node's
    ingest while it encodes them (:func:`ingest_while_encoding_rows`)."""
    spacing = tuple(f / n for f, n in zip(FIELD_MM, shape, strict=True))
    source = _series(shape, spacing, tmp / "ct")
    t0 = time.perf_counter()
    labels = wholebody_labels(shape, spacing)
    made = time.perf_counter() - t0
    segments = [segment_info_for(v, n) for v, n in enumerate(WHOLEBODY_LABELS, start=1)]
    counts = np.bincount(labels.ravel(), minlength=len(WHOLEBODY_LABELS) + 1)[1:]
    voxel_ml = float(np.prod(spacing)) / 1000
    grid = "x".join(map(str, shape[::-1]))
    rows = [
        _info_row(
            f"multiorgan {grid}: {int((counts > 0).sum())} of 104 wholeBody labels as organ "
            f"blobs of realistic size (median {np.median(counts) * voxel_ml:.0f} mL, on "
            f"{np.mean([len(np.flatnonzero((labels == v).any(axis=(1, 2)))) for v in range(1, 105)]):.0f}"
            f" slices on average; made in {made:.1f} s)"
        )
    ]
    settings = ResultSettings()
    binary = _encode(build_seg, source, labels, segments, ALGORITHM, settings)
    rows += _rows(f"SEG 104 labels {grid} binary native (peer: same)", binary, binary)
    for compression in ("rle", "jpegls"):
        rows.append(_info_row(f"SEG 104 labels binary {compression}: not offered (1-bit frames)"))
    for seg_type, compression in SEG_FORMATS:
        options = ResultSettings(seg_type=seg_type, seg_compression=compression)
        got = _encode(build_seg, source, labels, segments, ALGORITHM, options)
        rows += _rows(f"SEG 104 labels {grid} {seg_type} {compression} (peer: binary)", got, binary)
    rt = _encode(build_rtstruct, source, labels, segments, ALGORITHM, settings)
    rows += _rows(f"RTSTRUCT 104 labels {grid} (peer: binary SEG)", rt, binary)
    seg = build_seg(source, labels, segments, ALGORITHM, settings)
    sr = _encode(build_sr, seg, source, labels, segments, ALGORITHM, settings)
    rows += _rows(f"SR 104 labels {grid}, volumes (peer: binary SEG)", sr, binary)
    label_map_rle = ResultSettings(seg_type="labelmap", seg_compression="rle")
    alone = _encode(build_seg, source, labels, segments, ALGORITHM, label_map_rle)[1]
    one_after_other = alone + rt[1] + sr[1]
    pool = EncoderProcesses(
        ResultSettings().encode_processes, ResultSettings().encode_processes_min_labels
    )
    try:
        pool.start()
        together = _together(source, labels, segments, label_map_rle, pool, runs)
    finally:
        pool.close()
    in_threads = _together(source, labels, segments, label_map_rle, None, runs)
    rows.append(
        {
            "figure": f"SEG (label map RLE) + RTSTRUCT + SR 104 labels {grid}, built and "
            "written as the node makes them (s; the SEG in the node's process, the RTSTRUCT "
            "and the SR in its two encoder processes; target < 2 s; peer: the three one "
            "after the other)",
            "this_project": round(together, 3),
            "peer": round(one_after_other, 3),
            "ratio": round(together / one_after_other, 3),
        }
    )
    rows.append(
        {
            "figure": f"the same, all in the node's process (encode_processes = 0: in "
            f"threads; peer: in its encoder processes) {grid}",
            "this_project": round(in_threads, 3),
            "peer": round(together, 3),
            "ratio": round(in_threads / together, 3),
        }
    )
    if ingest:
        rows += ingest_while_encoding_rows(tmp / "ingest", source, labels, segments, runs)
    return rows


#: Slices of each series pushed while the 104 organs are encoded.
INGEST_SLICES = int(os.environ.get("BENCH_MULTIORGAN_INGEST_SLICES", "120"))


def ingest_while_encoding_rows(
    tmp: Path,
    source: SeriesVolume,
    labels: np.ndarray,
    segments: list,
    runs: int,
    slices: int = INGEST_SLICES,
) -> list[dict]:
    """Instances/s a node takes from ``storescu`` while its process encodes the 104 organs
    over and over: in its encoder processes (the default) and in its own threads
    (``encode_processes = 0``), and with nothing to encode; the three pushes of a run in a
    rotating order, median of ``runs``."""
    from bench.ingest import _push
    from dicom_node.node import Node
    from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
    from tests.peers import free_port

    settings = ResultSettings(seg_type="labelmap", seg_compression="rle")
    port = free_port()
    node = Node(
        settings_from_dict(
            {
                "node": {"data_dir": str(tmp / "node"), "host": "127.0.0.1", "port": port},
                "limits": {"min_free_disk_mb": 1},
                "inference": {"backend": "local"},  # no model: each series ends "no model"
            }
        )
    )
    pool = EncoderProcesses(
        ResultSettings().encode_processes, ResultSettings().encode_processes_min_labels
    )
    hu = np.random.default_rng(5).normal(40, 30, (slices, 512, 512)).astype(np.int16)
    speeds: dict[str, list[float]] = {"nothing": [], "processes": [], "threads": []}
    node.start()
    try:
        frozen = labels.copy()
        frozen.flags.writeable = False
        pool.encode(  # the workers forked, as for the node's first series
            EncodeContext(source, frozen, segments, ALGORITHM, settings),
            [EncodeRequest(encoders(), settings)],
        )
        for run in range(runs):
            order = list(speeds)[run % 3 :] + list(speeds)[: run % 3]
            for how in order:
                folder = tmp / f"ct-{run}-{how}"
                write_ct_series(hu, folder, spacing=(1.0, 0.7, 0.7), attrs=SeriesAttributes())
                stop = threading.Event()

                def encode(how: str = how, stop: threading.Event = stop) -> None:
                    while how != "nothing" and not stop.is_set():
                        frozen = labels.copy()
                        frozen.flags.writeable = False
                        context = EncodeContext(source, frozen, segments, ALGORITHM, settings)
                        requests = [EncodeRequest(encoders(), settings)]
                        if how == "processes":
                            pool.encode(context, requests)
                        else:
                            encode_in_process(context, requests)

                encoder = threading.Thread(target=encode)
                encoder.start()
                time.sleep(0.5 if how != "nothing" else 0)  # the encoding under way
                try:
                    speeds[how].append(_push(port, "DICOM_NODE", [folder]))
                finally:
                    stop.set()
                    encoder.join()
                shutil.rmtree(folder)
    finally:
        node.stop()
        pool.close()
    idle = statistics.median(speeds["nothing"])
    return [
        {
            "figure": f"ingest ({slices} slices, storescu) while the node encodes 104 "
            f"organs, {how} (inst/s; peer: the node with nothing to encode)",
            "this_project": round(statistics.median(speeds[how]), 1),
            "peer": round(idle, 1),
            "ratio": round(statistics.median(speeds[how]) / idle, 3),
        }
        for how in ("processes", "threads")
    ]


def _together(
    source: SeriesVolume,
    labels: np.ndarray,
    segments: list,
    settings: ResultSettings,
    pool: EncoderProcesses | None,
    runs: int,
) -> float:
    """Seconds to build SEG, RTSTRUCT and SR as the node's encoders do, each as the bytes
    of its file: in ``pool`` (:mod:`dicom_node.encode.processes`) or, without one, in this
    process's threads; median of ``runs``, after one run that is not counted (the workers
    are forked, as for a node's first series)."""
    times = []
    for _ in range(runs + 1):
        frozen = labels.copy()  # a new map: its index is made afresh, as for each result
        frozen.flags.writeable = False
        context = EncodeContext(source, frozen, segments, ALGORITHM, settings)
        requests = [EncodeRequest(encoders(), settings)]
        t0 = time.perf_counter()
        if pool is not None:
            pool.encode(context, requests)
        else:
            encode_in_process(context, requests)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# --- end to end ---------------------------------------------------------------------------


def lowres_bundle(dest: Path) -> Path:
    """The zoo's wholeBody bundle in its own low-resolution configuration, seeded weights."""

    root = dest / "wholeBody_ct_segmentation"
    shutil.copytree(ZOO / "configs", root / "configs")
    config = root / "configs" / "inference.json"
    doc = json.loads(config.read_text())
    doc["displayable_configs"]["highres"] = False
    config.write_text(json.dumps(doc, indent=4))
    write_seeded_weights(root)
    return root


class PlainMonai:
    """The plain MONAI way with a bundle: its parsed transforms and inferer on the stacked
    files, then a highdicom SEG. Built once, so that the runs time the series only.

    The network is ``models/model.ts`` where the bundle has one (as MONAI Deploy loads it),
    else the state dict where its checkpoint loader points. ``names`` are the labels'
    names, value 1 first."""

    def __init__(self, root: Path, names: list[str] | None = None) -> None:
        self.names = names or WHOLEBODY_LABELS
        parser = ConfigParser()
        parser.read_config(str(root / "configs" / "inference.json"))
        parser.read_meta(str(root / "configs" / "metadata.json"))
        parser["bundle_root"] = str(root)
        parser["device"] = "$torch.device('cpu')"
        self.pre = parser.get_parsed_content("preprocessing")
        self.steps = Compose([t for t in self.pre.transforms if not isinstance(t, LoadImaged)])
        post = parser.get_parsed_content("postprocessing")
        self.post = Compose([t for t in post.transforms if type(t).__name__ != "SaveImaged"])
        self.inferer = parser.get_parsed_content("inferer")
        if (root / "models" / "model.ts").is_file():
            self.network = torch.jit.load(str(root / "models" / "model.ts"), map_location="cpu")
        else:
            self.network = parser.get_parsed_content("network_def")
            state = torch.load(parser.get_parsed_content("checkpointloader#load_path"))
            self.network.load_state_dict(state)
        self.network.eval()

    def __call__(self, folder: Path, out: Path) -> float:
        t0 = time.perf_counter()
        datasets, hu, affine = read_series_plainly(folder)
        image = MetaTensor(
            torch.as_tensor(hu),
            affine=torch.as_tensor(ras_affine(affine)),
            meta={"original_channel_dim": "no_channel", "filename_or_obj": str(folder)},
        )
        with torch.no_grad():
            data = self.steps({"image": image})
            data["pred"] = self.inferer(data["image"][None], self.network)[0]
            data = self.post(data)
        # Invertd restores the input's own axes: (slice, row, column) of the sorted files
        labels = np.asarray(data["pred"][0]).round().astype(np.uint8)
        present = [int(v) for v in np.unique(labels) if v]
        lut = np.zeros(256, np.uint8)
        lut[present] = np.arange(1, len(present) + 1)
        descriptions = []
        for number, value in enumerate(present, start=1):
            info = segment_info_for(value, self.names[value - 1])
            descriptions.append(
                hd.seg.SegmentDescription(
                    segment_number=number,
                    segment_label=info.name,
                    segmented_property_category=info.category,
                    segmented_property_type=info.code,
                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                    algorithm_identification=ALGORITHM.seg_identification(),
                )
            )
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=lut[labels],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
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
        seg.save_as(out)
        return time.perf_counter() - t0


def e2e_rows(
    tmp: Path,
    shape: tuple[int, int, int] = E2E_SHAPE,
    backend: str = BACKEND,
    runs: int = E2E_RUNS,
    warm_up: bool = True,
) -> list[dict]:
    """Node vs the plain MONAI way, wholeBody low resolution, on a phantom of ``shape``
    (median of ``runs``, after one series that loads the models unless not ``warm_up``:
    then the first run's time includes loading them)."""
    from bench.e2e import _latency
    from dicom_node_testing.phantom import make_phantom
    from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
    from tests.peers import NodeProcess, Orthanc, free_port

    if not (ZOO / "configs" / "inference.json").is_file():
        return [_info_row(f"multiorgan e2e: left out, no wholeBody bundle configs at {ZOO}")]
    root = lowres_bundle(tmp / "bundle")
    phantom = make_phantom(shape=shape, spacing=E2E_SPACING, seed=shape[0])
    grid = "x".join(map(str, shape[::-1]))

    def series(seed: int) -> tuple[Path, SeriesAttributes]:
        attrs = SeriesAttributes(patient_id=f"BENCH-MO-{seed}")  # new UIDs every time
        folder = tmp / f"ct-{seed}"
        write_ct_series(phantom.hu, folder, spacing=phantom.spacing, attrs=attrs)
        return folder, attrs

    inference: dict = {"backend": backend, "startup_timeout_seconds": 600}
    if backend == "triton":
        inference |= {"grpc_port": free_port(), "http_port": free_port()}
        inference |= {"metrics_port": free_port()}
    pacs = Orthanc(tmp / "pacs").start()
    node = NodeProcess(
        tmp / "node",
        node={"settle_seconds": 10.0},
        inference=inference,
        models=[{"name": "wholebody", "bundle": str(root)}],
        routes=[{"models": ["wholebody"]}],
        destinations=[
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    )
    plain = PlainMonai(root)
    mine, peer, stages, sizes = [], [], [], {}
    try:
        node.start(timeout=600)
        if warm_up:
            folder, attrs = series(0)
            _latency(node, folder, attrs)  # the first job loads the models
        for run_ in range(1, runs + 1):
            folder, attrs = series(run_)
            latency, timings = _latency(node, folder, attrs)
            mine.append(latency)
            stages.append(timings)
            peer.append(plain(folder, tmp / f"plain-{run_}.dcm"))
            sizes["plain SEG"] = (tmp / f"plain-{run_}.dcm").stat().st_size
            shutil.rmtree(folder)
        for kind, ids in pacs.instances_by_modality().items():
            if kind != "CT":
                sizes[kind] = max(len(pacs.file(i)) for i in ids)
    finally:
        node.stop()
        pacs.stop()
    m, p = statistics.median(mine), statistics.median(peer)
    keys = ("completion", "assemble", "transfer", "pre", "inference", "post", "encode")
    split = {k: round(statistics.median(s.get(k, 0.0) for s in stages), 2) for k in keys}
    split["write+export"] = round(
        statistics.median(s.get("write", 0.0) + s.get("export", 0.0) for s in stages), 2
    )
    return [
        {
            "figure": f"multiorgan e2e {grid}, wholeBody 3 mm, seeded weights ({backend}): last "
            "C-STORE response to PACS ack of SEG + RTSTRUCT + SR, s (peer: plain MONAI way "
            "to a SEG)",
            "this_project": round(m, 2),
            "peer": round(p, 2),
            "ratio": round(m / p, 2),
        },
        _info_row(
            f"multiorgan e2e {grid} stages (s): " + ", ".join(f"{k} {v}" for k, v in split.items())
        ),
        _info_row(
            "multiorgan e2e object sizes (MB; seeded weights speckle the labels): "
            + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(sizes.items()))
        ),
    ]


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-multiorgan-") as tmp:
        rows = encode_rows(Path(tmp) / "encode")
        if not E2E:
            rows.append(_info_row("multiorgan e2e: left out (BENCH_MULTIORGAN_E2E=0)"))
        else:
            rows += e2e_rows(Path(tmp) / "e2e")
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
