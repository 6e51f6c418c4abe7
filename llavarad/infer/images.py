"""Image files in, the vision tower's input tensor out.

`load_image` turns any supported file into the 8-bit RGB picture the model was trained on;
`preprocess` is open_clip's default eval transform, which LLaVA-Rad applies (no padding to square).
"""

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from llavarad.errors import first_line

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HIGH_DEPTH_MODES = ("I", "F")  # plus every "I;16*" variant


def _minmax_to_uint8(values: np.ndarray, path: str) -> np.ndarray:
    """min..max -> 0..255, truncating (numpy's astype), as MIMIC-CXR-JPG did; a constant image -> 0."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: cannot read image (pixel values include NaN or infinity)")
    lo, hi = values.min(), values.max()
    if hi == lo:
        return np.zeros(values.shape, np.uint8)
    return ((values - lo) / (hi - lo) * 255).astype(np.uint8)


def _equalize_hist(image: np.ndarray) -> np.ndarray:
    """OpenCV's cv2.equalizeHist on a uint8 image, step for step (float32 scale, round half to even)."""
    hist = np.bincount(image.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])  # darkest level present, mapped to 0
    if hist[first] == image.size:
        return image.copy()  # a single level: OpenCV leaves it as it is
    scale = np.float32(255.0) / np.float32(image.size - hist[first])
    cumulative = np.cumsum(hist) - hist[first]  # pixels above the darkest level, up to each level
    lut = np.clip(np.rint(cumulative.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return lut[image]


def _is_dicom(file: BinaryIO, suffix: str = "") -> bool:
    if suffix.lower() == ".dcm":
        return True
    start = file.read(132)
    file.seek(0)
    return start[128:132] == b"DICM"  # the DICOM preamble is 128 bytes, then the magic


class TooManyPixels(ValueError):
    pass


def _check_pixels(width: int, height: int, name: str, max_pixels: int | None) -> None:
    """Refuse an image by its header's size, before decoding: a small file can claim billions of pixels."""
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(f"{name}: image of {width}x{height} pixels is over the limit of {max_pixels} pixels")


def _load_dicom(file: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    try:
        import pydicom
    except ImportError:
        raise ValueError(f"{name}: reading DICOM files needs pydicom (pip install pydicom)") from None
    try:
        ds = pydicom.dcmread(file)
        _check_pixels(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)) * int(ds.get("NumberOfFrames", 1) or 1), name, max_pixels)
        pixels = ds.pixel_array  # stored values: pydicom applies no LUT here
    except TooManyPixels:
        raise
    except Exception as e:  # pydicom raises many types (bad header, no pixel data, missing codec)
        raise ValueError(f"{name}: cannot read image ({first_line(e)})") from None
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or pixels.ndim != 2:
        raise ValueError(
            f"{name}: cannot read image (expected one grayscale frame, MONOCHROME1 or MONOCHROME2; got "
            f"{photometric or 'no PhotometricInterpretation'} with pixel array shape {pixels.shape})"
        )
    image = _minmax_to_uint8(pixels, name)
    if photometric == "MONOCHROME1":  # low values are meant to be white
        image = 255 - image
    return Image.fromarray(_equalize_hist(image)).convert("RGB")


def _decode(file: BinaryIO, name: str, suffix: str, formats: tuple[str, ...] | None, max_pixels: int | None) -> Image.Image:
    """load_image / read_image on an open binary file; `name` starts every error message."""
    if _is_dicom(file, suffix):
        return _load_dicom(file, name, max_pixels)
    try:
        with Image.open(file, formats=formats) as image:
            _check_pixels(*image.size, name, max_pixels)
            image.load()  # decode now, so a truncated file fails here
            if not (image.mode in _HIGH_DEPTH_MODES or image.mode.startswith("I;16")):
                return image.convert("RGB")
            values = np.asarray(image)  # (H, W) uint16, int32 or float32
    except TooManyPixels:
        raise
    except UnidentifiedImageError:  # its message names the file object, not the file
        what = "not a PNG, JPEG or DICOM file" if formats else "not an image file PIL can read"
        raise ValueError(f"{name}: cannot read image ({what})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: cannot read image ({first_line(e)})") from None
    return Image.fromarray(_minmax_to_uint8(values, name)).convert("RGB")


def load_image(path: str) -> Image.Image:
    """Reads an image file as 8-bit RGB, the way the training images (MIMIC-CXR-JPG) were made.

    - 8-bit files (JPEG, PNG, anything PIL reads; L, P, LA, RGBA, ...): PIL's convert("RGB"), which
      is what LLaVA-Rad does. EXIF orientation is not applied, as in LLaVA-Rad.
    - 16-bit or 32-bit grayscale (PIL modes "I;16", "I", "F", e.g. 16-bit PNG or TIFF): PIL's
      convert would clip everything above 255 to white, so the values are scaled by their own range
      instead: out = floor((v - min) / (max - min) * 255); a constant image becomes black.
    - DICOM (a .dcm suffix or the DICM magic; needs pydicom): the recipe that made MIMIC-CXR-JPG from
      MIMIC-CXR, as published by the dataset's author (github MIT-LCP/mimic-cxr issue 16):
      1. the stored pixel values (pydicom's pixel_array; no modality LUT, no VOI LUT or window);
      2. the min-max rule above, to uint8;
      3. MONOCHROME1 inverted (255 - v);
      4. histogram equalization, exactly as OpenCV's cv2.equalizeHist.
      (MIMIC-CXR-JPG then saved JPEG at quality 95; that lossy step is not reproduced.)
      Only single-frame grayscale DICOMs are accepted.
    Raises FileNotFoundError for a missing file and ValueError for a folder or ("<path>: cannot read
    image (...)") anything that is not a readable image.
    """
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{path}: is a folder, expected an image file")
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(file, "rb") as f:
        return _decode(f, path, file.suffix, None, None)


def read_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """load_image for bytes received from a client: only PNG, JPEG or DICOM (the DICM magic), and
    only up to `max_pixels` pixels, checked from the header before anything is decoded.
    Raises ValueError("<name>: ...") for anything else."""
    return _decode(io.BytesIO(data), name, "", ("PNG", "JPEG"), max_pixels)


def resize_and_crop(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """The geometry of `preprocess` for a w x h image: the resized (new_w, new_h) and the crop's
    (left, top) in the resized image; the crop is size x size."""
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def preprocess(image: Image.Image, size: int = 518) -> Tensor:
    """PIL image -> (3, size, size) float32: open_clip's default eval transform, step for step.

    Resize the shorter side to `size` with PIL bicubic (the longer side becomes
    int(size * long / short), torchvision's Resize(int) rule), center-crop size x size (offsets
    int(round((side - size) / 2)), torchvision's rule), convert to RGB (after the crop, as
    open_clip does), scale to [0, 1], normalize with the OpenAI CLIP mean and std.
    Pass the output of load_image: a 16-bit image given here directly would be clipped as in open_clip.
    """
    new_w, new_h, left, top = resize_and_crop(*image.size, size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.array(image, dtype=np.uint8))  # (S, S, 3)
    x = x.permute(2, 0, 1).float().div(255)  # (3, S, S) in [0, 1]
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (x - mean) / std  # (3, S, S)
