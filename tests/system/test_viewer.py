"""The radiologist's view: a phantom through the node into its embedded Orthanc, shown by
the pinned OHIF in headless Chromium.

The node starts the embedded PACS (Orthanc + DICOMweb plugin) and the viewer itself, as
``make run`` does. Each check reads a screenshot: where the SEG's outline and the
RTSTRUCT's contour must be drawn is computed from the DICOM geometry (pixel spacing, the
result's own mask or contour points) and the viewport's size, with the image fitted and
centred as OHIF shows a stack; the viewport's own world-to-canvas mapping is only
compared with it. OHIF decodes a SEG in a web worker, so every check polls its
screenshots until a deadline rather than waiting for page load. Screenshots are kept in
``var/test-artefacts/viewer/``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from skimage.color import lab2rgb

from dicom_node.encode.sr import largest_outline
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import ROOT, NodeProcess, free_port, storescu

pytestmark = [pytest.mark.slow, pytest.mark.cost(40)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
VIEWER_DIR = ROOT / ".ohif" / "app-3.13.2"
ARTEFACTS = ROOT / "var" / "test-artefacts" / "viewer"
#: How far (screen pixels) a drawn outline may lie from where the geometry puts it.
TOLERANCE_PX = 2
#: A pixel shows an overlay's colour when it is tinted towards it: the CT is grey, so its
#: chroma (the pixel less its grey level) must be this strong and point the colour's way.
#: Thin contours are anti-aliased into the CT, so their exact colour is rarely drawn.
MIN_CHROMA = 12.0
MIN_COSINE = 0.9


def _require() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not (VIEWER_DIR / "index.html").exists():
        missing.append(f"{VIEWER_DIR} (make install)")
    if not Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists():
        missing.append("orthanc-dicomweb")
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The node with its embedded PACS and viewer, a phantom pushed through it, and the
    results read back from the embedded Orthanc."""
    _require()
    work = tmp_path_factory.mktemp("viewer")
    orthanc_http = free_port()
    status_port = free_port()
    node = NodeProcess(
        work,
        inference={"backend": "local"},
        status={"enabled": True, "port": status_port},
        destinations=[
            {
                "name": "viewer",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": free_port(),
                "embedded": True,
                "retry_backoff_seconds": 0.5,
                "max_backoff_seconds": 2.0,
            }
        ],
        embedded={"viewer_port": free_port(), "orthanc_http_port": orthanc_http},
    ).start()
    try:
        phantom = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=4242)
        write_ct_series(phantom.hu, work / "ct", spacing=phantom.spacing, attrs=SeriesAttributes())
        assert storescu(node.port, work / "ct").returncode == 0
        jobs = node.wait_for(
            lambda js: (
                bool(js)
                and js[0]["state"] == "done"
                and all(o["state"] == "sent" for o in js[0]["outbox"])
            ),
            timeout=120,
            what="results sent to the embedded PACS",
            failures_allowed=False,
        )
        rest = f"http://127.0.0.1:{orthanc_http}"
        deadline = time.time() + 60
        while _get_json(f"{rest}/statistics")["CountInstances"] < 43:  # 40 CT + 3 results
            assert time.time() < deadline, "the CT never reached the embedded PACS"
            time.sleep(0.2)
        objects: dict[str, pydicom.Dataset] = {}
        for series in _get_json(f"{rest}/series?expand"):
            modality = series["MainDicomTags"]["Modality"]
            if modality != "CT":
                raw = urllib.request.urlopen(f"{rest}/instances/{series['Instances'][0]}/file")
                objects[modality] = pydicom.dcmread(io.BytesIO(raw.read()))
        ct = {
            str(ds.SOPInstanceUID): ds
            for ds in (pydicom.dcmread(p) for p in sorted((work / "ct").iterdir()))
        }
        viewer = _viewer_url(node)
        yield {
            "node": node,
            "job": jobs[0],
            "viewer": viewer,
            "status": f"http://127.0.0.1:{status_port}",
            "study_uid": jobs[0]["study_uid"],
            "ct": ct,
            **objects,
        }
    finally:
        node.stop()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _viewer_url(node: NodeProcess) -> str:
    for line in node.log.read_text().splitlines():
        if line.startswith("viewer: "):
            return line.split(" ", 1)[1].strip()
    raise AssertionError(f"the node printed no viewer URL:\n{node.tail()}")


@pytest.fixture(scope="module")
def browser(study, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-unsafe-swiftshader",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,800",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _open(browser, study: dict, series_uid: str) -> None:
    """Open the viewer on the study with ``series_uid`` loaded, past the first-visit tour."""
    from selenium.webdriver.common.by import By

    from dicom_node.service.viewer import viewer_link

    browser.get(viewer_link(study["viewer"], study["study_uid"], series_uid))
    deadline = time.time() + 60
    while time.time() < deadline:
        if _viewport(browser) is not None:
            break
        time.sleep(0.25)
    else:
        raise AssertionError("OHIF never showed an image viewport")
    for button in browser.find_elements(By.XPATH, "//*[normalize-space(text())='Skip all']"):
        button.click()


_VIEWPORT_JS = """
const cs = window.cornerstone;
if (!cs) return null;
for (const engine of cs.getRenderingEngines()) {
  for (const v of engine.getViewports()) {
    if (!v.getCurrentImageId || !v.getCurrentImageId()) continue;
    const r = v.canvas.getBoundingClientRect();
    return {left: r.left, top: r.top, width: r.width, height: r.height,
            imageId: v.getCurrentImageId(), imageIds: v.getImageIds(),
            worldToCanvas: (arguments[0] || []).map(p => v.worldToCanvas(p))};
  }
}
return null;
"""


def _viewport(browser, world_points: list | None = None) -> dict | None:
    return browser.execute_script(_VIEWPORT_JS, world_points or [])


def _show_image(browser, sop_uid: str) -> None:
    """Scroll the stack to the CT image ``sop_uid``."""
    browser.execute_script(
        """
        for (const engine of window.cornerstone.getRenderingEngines())
          for (const v of engine.getViewports()) {
            const i = v.getImageIds().findIndex(id => id.includes(arguments[0]));
            if (i >= 0) v.setImageIdIndex(i);
          }
        """,
        sop_uid,
    )


def _screenshot(browser, name: str) -> np.ndarray:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    png = browser.get_screenshot_as_png()
    (ARTEFACTS / f"{name}.png").write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _to_screen(view: dict, ct: pydicom.Dataset, cols_rows: np.ndarray) -> np.ndarray:
    """Screen pixel (x, y) of image coordinates (column, row; PS3.3 C.18.6.1.1) of ``ct``
    as OHIF shows a stack: the image fitted whole into the canvas, centred."""
    rows, cols = int(ct.Rows), int(ct.Columns)
    dy, dx = (float(v) for v in ct.PixelSpacing)  # row spacing, column spacing (mm)
    scale = min(view["width"] / (cols * dx), view["height"] / (rows * dy))  # px per mm
    centre = np.array([view["left"] + view["width"] / 2, view["top"] + view["height"] / 2])
    mm = (np.asarray(cols_rows, float) - [cols / 2, rows / 2]) * [dx, dy]
    return centre + mm * scale


def _image_to_world(ct: pydicom.Dataset, cols_rows: np.ndarray) -> list[list[float]]:
    """LPS position of image coordinates, from the image plane attributes."""
    o = np.asarray(ct.ImagePositionPatient, float)
    row_dir, col_dir = np.asarray(ct.ImageOrientationPatient, float).reshape(2, 3)
    dy, dx = (float(v) for v in ct.PixelSpacing)
    cr = np.asarray(cols_rows, float) - 0.5  # from the pixel's corner to its centre
    return (o + np.outer(cr[:, 0] * dx, row_dir) + np.outer(cr[:, 1] * dy, col_dir)).tolist()


def _world_to_image(ct: pydicom.Dataset, xyz: np.ndarray) -> np.ndarray:
    o = np.asarray(ct.ImagePositionPatient, float)
    row_dir, col_dir = np.asarray(ct.ImageOrientationPatient, float).reshape(2, 3)
    dy, dx = (float(v) for v in ct.PixelSpacing)
    d = np.asarray(xyz, float) - o
    return np.stack([d @ row_dir / dx, d @ col_dir / dy], axis=1) + 0.5


def _coloured(shot: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Pixels tinted towards ``rgb`` (see :data:`MIN_CHROMA`)."""
    chroma = shot - shot.mean(axis=2, keepdims=True)
    target = np.asarray(rgb, float) - np.mean(rgb)
    norm = np.linalg.norm(chroma, axis=2)
    cosine = (chroma @ target) / (np.maximum(norm, 1e-9) * np.linalg.norm(target))
    return (norm >= MIN_CHROMA) & (cosine >= MIN_COSINE)


def _near(mask: np.ndarray, points: np.ndarray, radius: int) -> np.ndarray:
    """For each screen point, whether ``mask`` holds a pixel within ``radius`` of it."""
    out = []
    h, w = mask.shape
    for x, y in np.rint(points).astype(int):
        window = mask[
            max(0, y - radius) : min(h, y + radius + 1), max(0, x - radius) : min(w, x + radius + 1)
        ]
        out.append(bool(window.any()))
    return np.array(out)


def _wait_for_colour(
    browser, name: str, rgb, expected: np.ndarray, timeout: float = 60.0
) -> np.ndarray:
    """Screenshots until the colour lies within the tolerance of every expected point."""
    deadline = time.time() + timeout
    while True:
        shot = _screenshot(browser, name)
        hits = _near(_coloured(shot, rgb), expected, TOLERANCE_PX)
        if hits.all():
            return shot
        if time.time() > deadline:
            raise AssertionError(
                f"{name}: {int((~hits).sum())} of {len(hits)} outline points have no pixel of "
                f"{rgb} within {TOLERANCE_PX} px (screenshot in {ARTEFACTS})"
            )
        time.sleep(0.5)


def _check_geometry(browser, ct: pydicom.Dataset, view: dict) -> None:
    """The viewport's own mapping agrees with the fitted, centred model used here."""
    corners = np.array([[0.5, 0.5], [ct.Columns - 0.5, ct.Rows - 0.5]])
    mapped = _viewport(browser, _image_to_world(ct, corners))["worldToCanvas"]
    screen = np.asarray(mapped) + [view["left"], view["top"]]
    np.testing.assert_allclose(screen, _to_screen(view, ct, corners), atol=1.0)


def _wait_text(browser, texts: list[str], timeout: float = 30.0) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while True:
        body = browser.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts):
            return body
        if time.time() > deadline:
            raise AssertionError(f"not shown: {[t for t in texts if t not in body]}\n{body}")
        time.sleep(0.25)


def _open_panel(browser, name: str) -> None:
    from selenium.webdriver.common.by import By

    buttons = browser.find_elements(By.CSS_SELECTOR, f'[data-cy="{name}-btn"]')
    assert buttons, f"OHIF has no {name} panel button"
    buttons[0].click()


def _seg_plane(seg: pydicom.Dataset, sop_uid: str) -> np.ndarray:
    """Segment 1's mask on the CT image ``sop_uid``, from the SEG's frames."""
    reader = hd.seg.Segmentation.from_dataset(seg)
    return reader.get_pixels_by_source_instance(
        [sop_uid], segment_numbers=[1], combine_segments=True
    )[0].astype(bool)


def _largest_slice(seg: pydicom.Dataset, ct: dict) -> tuple[str, np.ndarray]:
    areas = {}
    reader = hd.seg.Segmentation.from_dataset(seg)
    for _, _, sop_uid in reader.get_source_image_uids():
        try:
            areas[sop_uid] = int(_seg_plane(seg, sop_uid).sum())
        except (KeyError, ValueError):
            continue
    sop_uid = max(areas, key=areas.get)
    return sop_uid, _seg_plane(seg, sop_uid)


def _lab_to_rgb(lab16: list[int]) -> tuple[int, int, int]:
    lab = [lab16[0] / 65535 * 100, lab16[1] / 65535 * 255 - 128, lab16[2] / 65535 * 255 - 128]
    return tuple(int(round(v * 255)) for v in lab2rgb(np.array([[lab]]))[0, 0])


def test_the_node_serves_the_viewer_and_links_each_finished_series(study) -> None:
    viewer = study["viewer"]
    config = urllib.request.urlopen(f"{viewer}/app-config.js").read().decode()
    assert '"disableConfirmationPrompts": true' in config
    # a client-side route of the viewer is its index.html
    page = urllib.request.urlopen(f"{viewer}/viewer?StudyInstanceUIDs=1.2.3").read().decode()
    assert "<html" in page.lower() and "app-config.js" in page
    # DICOMweb on the same origin, answered by the embedded Orthanc
    studies = _get_json(f"{viewer}/dicom-web/studies")
    assert [s["0020000D"]["Value"][0] for s in studies] == [study["study_uid"]]
    # the job page links the series to the viewer with its SEG loaded
    job = (
        urllib.request.urlopen(f"{study['status']}/jobs/{study['job']['series_uid']}")
        .read()
        .decode()
    )
    seg_series = study["SEG"].SeriesInstanceUID
    assert f"initialSeriesInstanceUID={seg_series}" in job.replace("&amp;", "&")
    assert f"{viewer}/viewer?StudyInstanceUIDs={study['study_uid']}" in job.replace("&amp;", "&")


def test_seg_overlay_is_drawn_in_its_colour_on_the_organ(study, browser) -> None:
    seg = study["SEG"]
    _open(browser, study, seg.SeriesInstanceUID)
    sop_uid, plane = _largest_slice(seg, study["ct"])
    ct = study["ct"][sop_uid]
    _show_image(browser, sop_uid)
    _open_panel(browser, "panelSegmentation")
    _wait_text(browser, [str(seg.SegmentSequence[0].SegmentLabel)])
    view = _viewport(browser)
    assert sop_uid in view["imageId"]
    _check_geometry(browser, ct, view)
    rgb = _lab_to_rgb(list(seg.SegmentSequence[0].RecommendedDisplayCIELabValue))
    outline = _to_screen(view, ct, largest_outline(plane))
    shot = _wait_for_colour(browser, "seg", rgb, outline)
    # the fill is tinted towards the colour inside, and nothing is drawn well outside
    inside = np.argwhere(plane)[:, ::-1] + 0.5
    centre = np.rint(_to_screen(view, ct, inside.mean(axis=0, keepdims=True))[0]).astype(int)
    assert plane[tuple(np.rint(inside.mean(axis=0) - 0.5).astype(int)[::-1])]
    pixel = shot[centre[1], centre[0]]
    assert _coloured(shot, rgb)[centre[1], centre[0]], f"fill {pixel} is not tinted as {rgb}"
    far = _to_screen(view, ct, np.argwhere(~_dilate(plane, 3))[:, ::-1] + 0.5)
    far = far[(far >= [view["left"], view["top"]]).all(axis=1)]
    far = far[
        (far < [view["left"] + view["width"] - 1, view["top"] + view["height"] - 1]).all(axis=1)
    ]
    assert not _near(_coloured(shot, rgb), far, 0).any(), "segment colour drawn off the organ"


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=n)


def test_rtstruct_contour_is_drawn_in_its_colour_with_its_name(study, browser) -> None:
    rt = study["RTSTRUCT"]
    roi = rt.StructureSetROISequence[0]
    contours = rt.ROIContourSequence[0]
    by_image: dict[str, list[np.ndarray]] = {}
    for c in contours.ContourSequence:
        uid = str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
        by_image.setdefault(uid, []).append(np.asarray(c.ContourData, float).reshape(-1, 3))
    sop_uid = max(by_image, key=lambda u: sum(len(p) for p in by_image[u]))
    ct = study["ct"][sop_uid]
    _open(browser, study, rt.SeriesInstanceUID)
    _show_image(browser, sop_uid)
    _open_panel(browser, "panelSegmentation")
    _wait_text(browser, [str(roi.ROIName)])
    view = _viewport(browser)
    assert sop_uid in view["imageId"]
    _check_geometry(browser, ct, view)
    points = np.concatenate([_world_to_image(ct, p) for p in by_image[sop_uid]])
    rgb = tuple(int(v) for v in contours.ROIDisplayColor)
    _wait_for_colour(browser, "rtstruct", rgb, _to_screen(view, ct, points))


def _listed_outline(sr: hd.sr.Comprehensive3DSR, tracking_uid: str) -> tuple[float, Dataset]:
    """The area and its SCOORD from the group that gives the finding ``tracking_uid`` its
    image coordinates (the one a viewer lists)."""
    for group in sr.content.get_image_measurement_groups():
        if group.tracking_uid == tracking_uid:
            (area,) = group.get_measurements(name=codes.SCT.Area)
            (scoord,) = (i for i in area[0].ContentSequence if i.ValueType == "SCOORD")
            return float(area.value), scoord
    raise AssertionError(f"no group of finding {tracking_uid} has image coordinates")


def test_sr_measurement_is_listed_with_its_volume_and_drawn_on_its_image(study, browser) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(study["SR"])
    (volume_group,) = sr.content.get_volumetric_roi_measurement_groups()
    (volume,) = volume_group.get_measurements(name=codes.SCT.Volume)
    area, scoord = _listed_outline(sr, volume_group.tracking_uid)
    sop_uid = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    _open(browser, study, study["SR"].SeriesInstanceUID)
    # OHIF reads the SR into its measurements (no prompt: disableConfirmationPrompts) and
    # jumps to the image the outline is drawn on
    deadline = time.time() + 30
    while sop_uid not in _viewport(browser)["imageId"]:
        assert time.time() < deadline, "the viewer did not show the SR's image"
        time.sleep(0.25)
    # the measurements panel lists the organ by its name with its TID 1411 volume
    _open_panel(browser, "trackedMeasurements")
    listing = f"{volume_group.tracking_identifier}: {volume.value:.2f} mL"
    panel = _wait_text(browser, ["Measurements (1)", listing])
    # ...and the area of the outline it drew, as the SR has it (OHIF rounds it)
    shown = [float(v) for v in re.findall(r"^([0-9.]+) mm²$", panel, re.MULTILINE)]
    assert len(shown) == 1 and abs(shown[0] - area) <= 0.005 * area, (shown, area)
    # the outline is drawn (yellow, OHIF's annotation colour) where the SCOORD puts it
    ct = study["ct"][sop_uid]
    view = _viewport(browser)
    _check_geometry(browser, ct, view)
    points = np.asarray(scoord.GraphicData, float).reshape(-1, 2)
    _wait_for_colour(browser, "sr", (255, 255, 0), _to_screen(view, ct, points))
    shutil.copy(ARTEFACTS / "sr.png", ARTEFACTS / "viewer.png")
