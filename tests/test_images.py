"""Image loading and preprocessing against PIL, open_clip's eval transform and the MIMIC-CXR-JPG recipe."""

import sys

import cv2
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from llavarad.infer.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image, preprocess


def picture(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Gradients plus noise, uint8: enough structure for bicubic resampling to matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 90 * np.sin(x / 5.0 + seed)[..., None] * np.cos(y / 7.0)[..., None]
    noisy = base + rng.normal(0, 25, (h, w, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8).squeeze()


@pytest.fixture(scope="module")
def reference_transform():
    import open_clip

    return lambda size: open_clip.image_transform(size, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


# --- preprocess ---------------------------------------------------------------------------------

CASES = [  # (file name, height, width, PIL mode, size)
    ("landscape.png", 37, 61, "RGB", 28),
    ("portrait.png", 61, 37, "RGB", 28),
    ("gray.png", 45, 33, "L", 28),
    ("photo.jpg", 53, 71, "RGB", 64),
    ("gray.jpg", 71, 53, "L", 64),
    ("small_upscaled.png", 20, 31, "RGB", 64),
    ("square.png", 50, 50, "RGB", 28),
    ("chest.jpg", 620, 517, "L", 518),
]


@pytest.mark.parametrize("name,h,w,mode,size", CASES)
def test_preprocess_matches_open_clip(tmp_path, reference_transform, name, h, w, mode, size):
    path = tmp_path / name
    Image.fromarray(picture(h, w, 1 if mode == "L" else 3)).convert(mode).save(path)
    want = reference_transform(size)(Image.open(path).convert("RGB"))  # LLaVA-Rad's load + processor
    got = preprocess(load_image(str(path)), size)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_preprocess_non_rgb_image_like_open_clip(reference_transform, mode):
    """open_clip converts to RGB after the crop; preprocess does the same for any PIL image."""
    if mode == "P":
        image = Image.fromarray(picture(33, 47)).quantize(64)
    else:
        image = Image.fromarray(picture(33, 47, 4)).convert(mode)
    torch.testing.assert_close(preprocess(image, 28), reference_transform(28)(image), rtol=0, atol=1e-6)


# --- load_image: ordinary and high-bit-depth files ----------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "LA", "RGBA"])
def test_8_bit_files_load_as_pil_rgb(tmp_path, mode):
    base = Image.fromarray(picture(29, 41, 4))
    image = base.convert("RGB").quantize(32) if mode == "P" else base.convert(mode)
    image.save(tmp_path / "x.png")
    got = load_image(str(tmp_path / "x.png"))
    assert got.mode == "RGB" and got.size == (41, 29)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Image.open(tmp_path / "x.png").convert("RGB")))


def _expected_minmax(values: np.ndarray) -> np.ndarray:
    """The documented rule, floor((v - min) / (max - min) * 255), written out independently."""
    v = values.astype(np.float64)
    return np.floor((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


def test_16_bit_png_is_scaled_by_its_range_not_clipped(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.integers(500, 3501, size=(23, 31)).astype(np.uint16)  # 12-bit detector values
    values[0, 0], values[-1, -1] = 500, 3500
    Image.fromarray(values).save(tmp_path / "cxr16.png")
    assert Image.open(tmp_path / "cxr16.png").mode.startswith("I")
    clipped = np.asarray(Image.open(tmp_path / "cxr16.png").convert("RGB"))
    assert (clipped == 255).all()  # what a plain convert("RGB") would feed the model

    got = np.asarray(load_image(str(tmp_path / "cxr16.png")))
    assert got.dtype == np.uint8 and got.shape == (23, 31, 3)
    np.testing.assert_array_equal(got[..., 0], _expected_minmax(values))
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    assert got.min() == 0 and got.max() == 255 and 100 < got.mean() < 155


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_32_bit_tiff_is_scaled_by_its_range(tmp_path, dtype):
    values = (np.random.default_rng(4).normal(0, 1000, (17, 19))).astype(dtype)  # negatives included
    Image.fromarray(values).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode in ("I", "F")
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "x.tif")))[..., 0], _expected_minmax(values))


def test_constant_16_bit_image_is_black(tmp_path):
    Image.fromarray(np.full((8, 9), 4000, np.uint16)).save(tmp_path / "flat.png")
    assert (np.asarray(load_image(str(tmp_path / "flat.png"))) == 0).all()


# --- load_image: bad files ----------------------------------------------------------------------


def _truncated_png(path):
    Image.fromarray(picture(64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_jpeg(path):
    Image.fromarray(picture(64, 64)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("name,write", [
    ("notes.txt", lambda p: p.write_text("Findings: none.\nImpression: normal.\n")),
    ("empty.png", lambda p: p.write_bytes(b"")),
    ("garbage.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)),
    ("cut.png", _truncated_png),
    ("cut.jpg", _truncated_jpeg),
    ("notes.dcm", lambda p: p.write_text("not a dicom file")),
])
def test_unreadable_file_gives_one_clear_line(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as e:
        load_image(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: cannot read image (") and message.endswith(")")
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.png: no such file"):
        load_image(str(tmp_path / "nothing.png"))


# --- DICOM --------------------------------------------------------------------------------------


def mimic_cxr_jpg(path) -> np.ndarray:
    """How MIMIC-CXR-JPG was made from MIMIC-CXR, per its author (MIT-LCP/mimic-cxr issue 16):
    raw pixel_array, min-max to uint8, MONOCHROME1 inverted, cv2.equalizeHist."""
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    raw = raw - raw.min()
    image = (raw / raw.max() * 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = cv2.bitwise_not(image)
    return cv2.equalizeHist(image)


def write_cr(path, pixels: np.ndarray, photometric: str, with_pixels: bool = True) -> None:
    """A 12-bit computed radiograph, with rescale and window tags (which the recipe ignores)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-100"
    ds.WindowCenter, ds.WindowWidth = "2000", "800"
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def cr_pixels():
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:48, 0:40]
    return np.clip(1800 + 900 * np.sin(x / 6) * np.cos(y / 9) + rng.normal(0, 150, (48, 40)), 0, 4095).astype(np.uint16)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "image_dfl.dcm"])
def test_bundled_dicom_follows_mimic_cxr_jpg_recipe(name):
    path = get_testdata_file(name, download=False)
    got = load_image(path)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got)[..., 0], mimic_cxr_jpg(path))
    assert (np.asarray(got)[..., 0] == np.asarray(got)[..., 2]).all()


@pytest.mark.parametrize("file_name", ["cr.dcm", "cr_without_suffix"])
def test_monochrome1_cr_is_inverted(tmp_path, cr_pixels, file_name):
    write_cr(tmp_path / file_name, cr_pixels, "MONOCHROME1")
    write_cr(tmp_path / "mono2.dcm", cr_pixels, "MONOCHROME2")
    mono1 = np.asarray(load_image(str(tmp_path / file_name)))[..., 0]
    mono2 = np.asarray(load_image(str(tmp_path / "mono2.dcm")))[..., 0]
    np.testing.assert_array_equal(mono1, mimic_cxr_jpg(tmp_path / file_name))
    np.testing.assert_array_equal(mono2, mimic_cxr_jpg(tmp_path / "mono2.dcm"))
    assert np.corrcoef(mono1.ravel().astype(float), cr_pixels.ravel().astype(float))[0, 1] < -0.95
    assert np.corrcoef(mono2.ravel().astype(float), cr_pixels.ravel().astype(float))[0, 1] > 0.95


def test_equalization_is_opencvs():
    rng = np.random.default_rng(6)
    from llavarad.infer.images import _equalize_hist

    images = [rng.integers(0, 256, (31, 17)), (rng.beta(2, 5, (300, 200)) * 255), rng.integers(40, 90, (9, 9)),
              np.full((5, 6), 77), np.array([[0, 255]])]
    for image in (im.astype(np.uint8) for im in images):
        np.testing.assert_array_equal(_equalize_hist(image), cv2.equalizeHist(image))


def test_dicom_errors(tmp_path, cr_pixels, monkeypatch):
    with pytest.raises(ValueError, match=r"expected one grayscale frame, MONOCHROME1 or MONOCHROME2; got "
                                         r"MONOCHROME2 with pixel array shape \(15, 10, 10\)"):
        load_image(get_testdata_file("rtdose.dcm", download=False))  # multi-frame
    write_cr(tmp_path / "empty.dcm", cr_pixels, "MONOCHROME2", with_pixels=False)
    with pytest.raises(ValueError, match=r"empty\.dcm: cannot read image \(.*no pixel data"):
        load_image(str(tmp_path / "empty.dcm"))
    write_cr(tmp_path / "cr.dcm", cr_pixels, "MONOCHROME2")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(ValueError, match=r"cr\.dcm: reading DICOM files needs pydicom \(pip install pydicom\)"):
        load_image(str(tmp_path / "cr.dcm"))
