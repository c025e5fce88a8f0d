"""An independent judge of a scene image against its caption: a detector built from the renderer's palette
and shapes (not a model, so it cannot share a generator's mistakes).

::

    judgement = judge(image, "a red circle left of a small blue square")  # (H, W, 3) uint8 or (3, H, W) in [-1, 1]
    judgement.correct, judgement.reasons  # False, ["expected a small blue square; found a large blue square"]
    judgement.objects[0].mask  # the detection of the red circle: (H, W) bool, for the word-map pointing game

How :func:`detect` reads an image:

1. a pixel takes a palette colour when it lies at least half way from the
   :data:`~qkv.data.scenes.BACKGROUND` to that colour and within ``tolerance`` (RGB, 0..255) of the line
   between them (the nearest such line wins), and is background otherwise: a generated image is noisy and
   blurry, and a blurred edge is a mix of background and colour, whose half-way point is where the edge was;
2. the pixels of one colour split into 8-connected components; those of at least ``min_area`` pixels (at
   32 x 32, scaled by the image's area) are objects, smaller ones are specks;
3. the shape is the template (circle, square, upward triangle; :func:`~qkv.data.scenes.shape_mask`) of the
   component's area, placed at its centroid (give or take half a pixel), that overlaps it best
   (intersection over union); ``"unknown"`` when even the best covers less than :data:`MIN_SHAPE_IOU`, so a
   formless blob is no circle. A whole-mask fit, not the bounding box's corners: noise on a 9-pixel square
   moves its corners but hardly its overlap with a square;
4. the size compares ``sqrt(area / ideal fill of the shape)`` (the side or diameter the area implies) with
   the geometric mean of the small and large sides; the centre is the mask's centroid.

:func:`judge` parses the caption (:func:`~qkv.data.scene_captions.parse_caption`) and matches each named object to a
distinct detection (the assignment with most objects right); it is correct when every object is found with
its colour and shape (and size when named), nothing else is there, and for two objects the relation holds
between their centres (:func:`~qkv.data.scenes.relation_holds`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from qkv.checks import positive_number
from qkv.data.parallel import DataError
from qkv.data.scene_captions import CaptionSpec, ObjectSpec, parse_caption
from qkv.data.scenes import BACKGROUND, COLOURS, REFERENCE_SIZE, SIZES, Scene, relation_holds, shape_mask

TOLERANCE = 80.0  # RGB distance (0..255 units) from a background-to-colour line within which a pixel has that colour
MIN_AREA = 12.0  # pixels at REFERENCE_SIZE: a third of the smallest object (a small triangle, about 40)
MIN_SHAPE_IOU = 0.6  # clean renders fit their template with IoU >= 0.97; blurred noisy ones (sigma 0.1) >= 0.85
SHIFTS = (-0.5, 0.0, 0.5)  # pixels by which a template is moved around the centroid to find its best fit
IDEAL_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # a shape's area / its box's area
UNKNOWN = "unknown"
_PALETTE_NAMES = ["background", *COLOURS]
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array(list(COLOURS.values()), dtype=np.float32) - _BACKGROUND  # (K, 3): background to colour


@dataclass(frozen=True)
class Detection:
    """An object found: its colour, shape and size words, ``mask (H, W)`` bool, and ``centre = (x, y)`` the
    mask's centroid as a share of the width / height."""

    colour: str
    shape: str
    size: str
    mask: np.ndarray
    centre: tuple[float, float]

    def describe(self) -> str:
        """``"large red circle at (0.31, 0.50)"``."""
        return f"{self.size} {self.colour} {self.shape} at ({self.centre[0]:.2f}, {self.centre[1]:.2f})"


@dataclass
class Judgement:
    """The verdict on one image: ``correct`` when ``reasons`` is empty; ``objects[i]`` the detection matched
    to the prompt's object ``i`` (``None`` when none was left), ``detections`` all that were found."""

    correct: bool
    reasons: list[str]
    detections: list[Detection] = field(default_factory=list)
    objects: list[Detection | None] = field(default_factory=list)


def _pixels(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float32 in ``[0, 255]``."""
    if isinstance(image, torch.Tensor):
        if image.dim() == 3 and image.shape[0] == 3 and image.is_floating_point():
            scaled = (image.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) * 127.5
            return np.ascontiguousarray(scaled.numpy().transpose(1, 2, 0))
        got = f"a {image.dtype} tensor of shape {tuple(image.shape)}"
    elif isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return image.astype(np.float32)
        got = f"a {image.dtype} array of shape {image.shape}"
    else:
        got = type(image).__name__
    raise DataError(f"image must be an (H, W, 3) uint8 array or a (3, H, W) float tensor in [-1, 1]; got {got}")


def colour_labels(image: np.ndarray | torch.Tensor, tolerance: float = TOLERANCE) -> np.ndarray:
    """``(H, W)`` int: 0 for background, ``k`` for the ``k``-th colour of :data:`COLOURS` (step 1 above)."""
    offsets = _pixels(image) - _BACKGROUND  # (H, W, 3)
    share = (offsets @ _DIRECTIONS.T) / (_DIRECTIONS**2).sum(axis=1)  # (H, W, K): 0 background, 1 the colour
    along = np.clip(share, 0.0, 1.0)[..., None] * _DIRECTIONS  # (H, W, K, 3): nearest point on each line
    residual = np.linalg.norm(offsets[:, :, None, :] - along, axis=-1)  # (H, W, K)
    residual[(share < 0.5) | (residual > tolerance)] = np.inf
    nearest = residual.argmin(axis=-1)
    return np.where(np.isfinite(residual.min(axis=-1)), nearest + 1, 0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of ``mask (H, W)`` bool, each as ``(n, 2)`` int ``(y, x)`` pixel indices."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    components = []
    for start_y, start_x in zip(*np.nonzero(mask), strict=True):
        if seen[start_y, start_x]:
            continue
        seen[start_y, start_x] = True
        queue, pixels = deque([(int(start_y), int(start_x))]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        components.append(np.array(pixels, dtype=np.int64))
    return components


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """``(shape, iou)``: the template that fits the component ``mask (H, W)`` bool best and its overlap, or
    ``("unknown", iou)`` below :data:`MIN_SHAPE_IOU` (step 3 above)."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    area, cx, cy = len(ys), float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    best_shape, best_iou = UNKNOWN, 0.0
    for shape, fill in IDEAL_FILL.items():
        side = math.sqrt(area / fill)
        box_y = cy - side / 6 if shape == "triangle" else cy  # a triangle's centroid is a sixth below its box's centre
        for dx, dy in itertools.product(SHIFTS, SHIFTS):
            template = shape_mask(shape, (cx + dx, box_y + dy), side, max(height, width))[:height, :width]
            iou = float((template & mask).sum() / (template | mask).sum())
            if iou > best_iou:
                best_shape, best_iou = shape, iou
    return (best_shape if best_iou >= MIN_SHAPE_IOU else UNKNOWN), best_iou


def size_word(area: int, shape: str, image_size: float) -> str:
    """``"small"`` or ``"large"``: the side implied by ``area`` pixels of ``shape`` (a square's for an unknown
    shape) against the geometric mean of the two :data:`SIZES` at ``image_size`` (step 4 above)."""
    side = math.sqrt(area / IDEAL_FILL.get(shape, 1.0))
    (small_word, small), (large_word, large) = sorted(SIZES.items(), key=lambda item: item[1])
    return small_word if side < math.sqrt(small * large) * image_size / REFERENCE_SIZE else large_word


def detect(
    image: np.ndarray | torch.Tensor, *, tolerance: float = TOLERANCE, min_area: float = MIN_AREA
) -> list[Detection]:
    """The objects in ``image``, ``(H, W, 3)`` uint8 or ``(3, H, W)`` float in ``[-1, 1]``, ordered by their
    centres (left to right, then top to bottom); see the module docstring for how.

    Args:
        tolerance: the RGB distance (0..255) from the background-to-colour line within which a pixel can take
            that colour.
        min_area: the fewest pixels of an object at 32 x 32 (scaled by the image's area).
    """
    positive_number("tolerance", tolerance, error=DataError)
    positive_number("min_area", min_area, error=DataError)
    labels = colour_labels(image, tolerance)
    height, width = labels.shape
    smallest = min_area * height * width / REFERENCE_SIZE**2
    found = []
    for label in range(1, len(_PALETTE_NAMES)):
        for pixels in _components(labels == label):
            if len(pixels) < smallest:
                continue
            ys, xs = pixels[:, 0], pixels[:, 1]
            mask = np.zeros((height, width), dtype=bool)
            mask[ys, xs] = True
            shape, _ = classify_shape(mask)
            centre = ((float(xs.mean()) + 0.5) / width, (float(ys.mean()) + 0.5) / height)
            size = size_word(len(pixels), shape, math.sqrt(height * width))
            found.append(Detection(_PALETTE_NAMES[label], shape, size, mask, centre))
    return sorted(found, key=lambda d: (d.centre[0], d.centre[1]))


def _agreement(spec: ObjectSpec, found: Detection | None) -> tuple[bool, int]:
    """Whether ``found`` is ``spec`` (colour, shape, and size when named), and how many of those agree."""
    if found is None:
        return False, 0
    checks = [spec.colour == found.colour, spec.shape == found.shape]
    if spec.size is not None:
        checks.append(spec.size == found.size)
    return all(checks), sum(checks)


def _best_match(spec: CaptionSpec, detections: list[Detection]) -> list[Detection | None]:
    """The detection (or ``None``) for each object of ``spec``: distinct detections, most objects right,
    then most attributes right, then the relation holding."""
    best_score = (-1, -1, -1)
    best: list[Detection | None] = [None for _ in spec.objects]
    options = [*range(len(detections)), None]
    for picked in itertools.product(options, repeat=len(spec.objects)):
        used = [i for i in picked if i is not None]
        if len(used) != len(set(used)):
            continue
        matched = [None if i is None else detections[i] for i in picked]
        agreements = [_agreement(obj, found) for obj, found in zip(spec.objects, matched, strict=True)]
        score = (sum(ok for ok, _ in agreements), sum(n for _, n in agreements), int(_relation_ok(spec, matched)))
        if score > best_score:
            best_score, best = score, matched
    return best


def _relation_ok(spec: CaptionSpec, matched: list[Detection | None]) -> bool:
    if spec.relation is None:
        return True
    first, second = matched
    return first is not None and second is not None and relation_holds(first.centre, second.centre, spec.relation)


def judge(image: np.ndarray | torch.Tensor, prompt: str | Scene) -> Judgement:
    """Whether ``image`` shows what ``prompt`` (a caption, or a scene: its caption) asks for.

    Raises:
        DataError: the prompt does not parse (:func:`~qkv.data.scene_captions.parse_caption`) or the image has the
            wrong type or shape.
    """
    spec = parse_caption(prompt.caption if isinstance(prompt, Scene) else prompt)
    detections = detect(image)
    matched = _best_match(spec, detections)
    reasons = []
    if len(detections) != len(spec.objects):
        listed = "; ".join(d.describe() for d in detections) or "nothing"
        reasons.append(f"expected {len(spec.objects)} object(s); found {len(detections)}: {listed}")
    for obj, found in zip(spec.objects, matched, strict=True):
        ok, _ = _agreement(obj, found)
        if found is None:
            reasons.append(f"no {obj.describe()} found")
        elif not ok:
            reasons.append(f"expected a {obj.describe()}; found a {found.describe()}")
    first, second = matched[0], matched[-1]
    if spec.relation is not None and first is not None and second is not None and not _relation_ok(spec, matched):
        reasons.append(
            f"the {first.describe()} is not {spec.relation} the {second.describe()} (expected "
            f"{spec.objects[0].describe()} {spec.relation} {spec.objects[1].describe()})"
        )
    return Judgement(not reasons, reasons, detections, matched)
