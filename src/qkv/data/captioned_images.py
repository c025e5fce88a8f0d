"""The user's captioned images for text to image: a folder of images and a TSV of ``file<TAB>caption``.

::

    data = read_captioned_folder("photos", "photos/captions.tsv", image_size=32)
    data.images  # (N, 3, 32, 32) float32 in [-1, 1]
    data.captions[0], data.files[0]  # "a red circle left of a blue square", "0001.png"

The TSV (UTF-8, one example a line)::

    file<TAB>caption            <- an optional header line, exactly this
    0001.png<TAB>a red circle left of a blue square
    shapes/0002.jpg<TAB>a small green triangle

File paths are relative to the folder and stay inside it (no absolute path, no ``..``). Blank lines are
skipped. One file may have several captions (a line each: several examples sharing the image, as in
captioning datasets with five captions an image), but the same file with the same caption twice is an
error: a repeated line is almost always a mistake, and it would silently weigh that example double.
Each image is read as RGB (an alpha channel dropped, grey repeated) and resized to ``image_size`` x
``image_size`` with Pillow's (antialiased) bilinear filter, squeezing a non-square image rather than
cropping it: a caption may describe what is near the border ("a red circle left of ...").

Files are read as the rest of qkv reads what someone else may have made (:mod:`qkv.safe_files`):
regular files only, the TSV up to :data:`MAX_TSV_BYTES`, an image up to :data:`MAX_IMAGE_BYTES` and
:data:`MAX_IMAGE_PIXELS` pixels (checked from its header, before it is decoded). Every problem is a
:class:`~qkv.data.parallel.DataError` naming the TSV line and the file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from qkv.checks import int_at_least
from qkv.data.parallel import DataError, decode_lines
from qkv.safe_files import MiB, read_regular_file

CAPTIONS_FILE = "captions.tsv"
HEADER = ("file", "caption")
MAX_TSV_BYTES = 64 * MiB
MAX_IMAGE_BYTES = 64 * MiB
MAX_IMAGE_PIXELS = 64_000_000  # width x height; a larger image is a mistake (or a decompression bomb)
MIN_IMAGE_SIZE = 4


@dataclass
class CaptionedImages:
    """``images (N, 3, H, W)`` float32 in ``[-1, 1]``, ``captions[i]`` the caption of image ``i`` (stripped of
    surrounding whitespace), ``files[i]`` its path relative to the folder as the TSV writes it."""

    images: torch.Tensor
    captions: list[str]
    files: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs Pillow, which is not installed: pip install 'qkv[vision]'") from None
    return Image


def _read_tsv(path: Path) -> list[str]:
    try:
        data = read_regular_file(path, MAX_TSV_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: no such captions file; expected a TSV of file<TAB>caption lines") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"cannot read the captions file: {e}") from None
    return decode_lines(data, str(path))


def _inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` after checking ``name`` is a relative path that stays inside ``folder``."""
    relative = PurePosixPath(name.replace("\\", "/"))
    if not name.strip():
        raise DataError(f"{where}: the file name is empty; expected file<TAB>caption")
    if relative.is_absolute() or Path(name).is_absolute() or ".." in relative.parts:
        raise DataError(f"{where}: {name!r} must be a path relative to {folder} that stays inside it")
    return folder / Path(*relative.parts)


def read_image_file(path: Path, image_size: int, where: str) -> torch.Tensor:
    """One image as ``(3, image_size, image_size)`` float32 in ``[-1, 1]``; errors start with ``where``."""
    Image = _pillow()
    try:
        data = read_regular_file(path, MAX_IMAGE_BYTES)
    except FileNotFoundError:
        raise DataError(f"{where}: {path} does not exist") from None
    except OSError as e:
        raise DataError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"{where}: {path} is {width} x {height} pixels; expected at most {MAX_IMAGE_PIXELS:,} in all"
                )
            opened.load()
            image = opened.convert("RGB")
    except DataError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise DataError(f"{where}: {path} is not a readable image ({type(e).__name__}: {e})") from None
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)) / 127.5 - 1.0


def read_captioned_folder(
    folder: str | os.PathLike, captions_tsv: str | os.PathLike | None = None, *, image_size: int
) -> CaptionedImages:
    """The images of ``folder`` with their captions, one example per TSV line (see the module docstring).

    Args:
        folder: the directory the TSV's file paths are relative to.
        captions_tsv: the ``file<TAB>caption`` file (``None``: ``folder/captions.tsv``).
        image_size: the side every image is resized to.
    Raises:
        DataError: naming the file and line: ``folder`` is not a directory; the TSV is missing, not a regular
            file, too large, not UTF-8, or has no example; a line has no tab or more than one, an empty file
            name or caption, a path outside the folder, or repeats an earlier line's file and caption; an
            image does not exist, is not a regular file, too large, or not a readable image.
    """
    int_at_least("image_size", image_size, MIN_IMAGE_SIZE, error=DataError)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; expected the folder of captioned images")
    tsv = Path(captions_tsv) if captions_tsv is not None else folder / CAPTIONS_FILE
    lines = _read_tsv(tsv)
    decoded: dict[str, torch.Tensor] = {}
    seen: dict[tuple[str, str], int] = {}
    images, captions, files = [], [], []
    for number, line in enumerate(lines, start=1):
        where = f"{tsv} line {number}"
        if not line.strip() or (number == 1 and tuple(part.strip().lower() for part in line.split("\t")) == HEADER):
            continue
        tabs = line.count("\t")
        if tabs != 1:
            raise DataError(
                f"{where} has {tabs} tabs; expected exactly one, between file and caption "
                f"(got {line[:60]!r}{'…' if len(line) > 60 else ''})"
            )
        name, caption = (part.strip() for part in line.split("\t"))
        path = _inside(folder, name, where)
        if not caption:
            raise DataError(f"{where}: the caption of {name!r} is empty; expected a caption after the tab")
        if (name, caption) in seen:
            raise DataError(
                f"{where} repeats line {seen[name, caption]} ({name!r} with caption {caption!r}); expected each "
                "file and caption once (a file may have several different captions)"
            )
        seen[name, caption] = number
        if name not in decoded:
            decoded[name] = read_image_file(path, image_size, where)
        images.append(decoded[name])
        captions.append(caption)
        files.append(name)
    if not images:
        raise DataError(f"{tsv} has no captioned images; expected lines of file<TAB>caption")
    return CaptionedImages(torch.stack(images), captions, files)


def write_captioned_folder(
    images: torch.Tensor, captions: list[str], folder: str | os.PathLike, *, tsv_name: str = CAPTIONS_FILE
) -> Path:
    """Write ``images (N, 3, H, W)`` in ``[-1, 1]`` as ``folder/00000.png``... with a TSV of their
    ``captions`` (what :func:`read_captioned_folder` reads back); e.g. the built-in scenes as a user folder.
    Returns the TSV's path."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != len(captions):
        raise DataError(
            f"images must be (N, 3, H, W) with N = {len(captions)} captions; got shape {tuple(images.shape)}"
        )
    bad = [i for i, caption in enumerate(captions) if not caption.strip() or "\t" in caption or "\n" in caption]
    if bad:
        raise DataError(
            f"captions[{bad[0]}] must be non-empty text without tabs or line breaks; got {captions[bad[0]]!r}"
        )
    Image = _pillow()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    lines = ["\t".join(HEADER)]
    for index, caption in enumerate(captions):
        name = f"{index:05d}.png"
        Image.fromarray(pixels[index].permute(1, 2, 0).numpy()).save(folder / name)
        lines.append(f"{name}\t{caption.strip()}")
    tsv = folder / tsv_name
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv
