"""Paste a (regenerated) face crop back into its frame, as LatentSync's ``AlignRestore.restore_img`` does.

The crop is un-squashed to its 3:4 size, warped back with the inverse affine, and blended through a mask:
the crop's footprint, eroded so its seam lies inside the face box, then feathered with a Gaussian. Only
the footprint's bounding box is touched, so a 1080x1920 frame costs what the face costs; every pixel
where the mask is 0 comes out bit-identical to the input. Upstream warps with kornia (fp16 on GPU) and
truncates to uint8; we warp with cv2 in float32 and round.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from stream.face_alignment import FILL
from stream.frames import AlignedFace, GeneratedFrame, VideoFrame

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels (exclusive ends)


def paste_back(frame_rgb: np.ndarray, face_rgb: np.ndarray, face: AlignedFace) -> np.ndarray:
    """A copy of ``frame_rgb`` with ``face_rgb`` (the square crop, uint8) blended in where ``face`` came from."""
    out = frame_rgb.copy()
    masks = _masks(face, frame_rgb.shape)
    if masks is None:
        return out
    (x0, y0, x1, y1), inverse, footprint, soft = masks
    w, h = face.crop_size
    unsquashed = cv2.resize(face_rgb, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    blended = cv2.warpAffine(unsquashed, inverse, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL, FILL, FILL))
    region = frame_rgb[y0:y1, x0:x1].astype(np.float32)
    # soft * (footprint * face) + (1 - soft) * frame, written so that soft == 0 gives the frame exactly.
    blended *= footprint[..., None]
    blended -= region
    blended *= soft[..., None]
    blended += region
    out[y0:y1, x0:x1] = np.clip(np.rint(blended, out=blended), 0, 255)
    return out


def paste_mask(face: AlignedFace, frame_shape: tuple[int, ...], margin: int = 0) -> np.ndarray:
    """The frame-sized (H, W) float32 blend weight ``paste_back`` uses: 0 where the frame is kept as is.

    ``margin`` grows the non-zero area by that many pixels (for comparisons after lossy encoding).
    """
    weight = np.zeros(frame_shape[:2], np.float32)
    masks = _masks(face, frame_shape)
    if masks is None:
        return weight
    (x0, y0, x1, y1), _, _, soft = masks
    weight[y0:y1, x0:x1] = soft
    if margin:
        weight = cv2.dilate(weight, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    return weight


class PasteBack:
    """The paste stage: each generated frame out as a plain video frame (untouched when no face).

    The pasted frame keeps the source frame's trace, marked ``generated``: latency is accounted for
    the frames the model made as much as for those it let through.
    """

    name = "paste"

    def process(self, generated: GeneratedFrame) -> list[VideoFrame]:
        source = generated.source
        frame = source.frame
        if generated.mouth is None or source.face is None:
            return [frame]
        frame.trace.generated = True
        return [dataclasses.replace(frame, image=paste_back(frame.image, generated.mouth, source.face))]

    def flush(self) -> list[VideoFrame]:
        return []


def _masks(face: AlignedFace, frame_shape: tuple[int, ...]):
    """(box, inverse affine relative to the box, eroded footprint, soft blend mask) or None."""
    w, h = face.crop_size
    inverse = cv2.invertAffineTransform(face.affine)
    box = _footprint_box(inverse, w, h, frame_shape)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    inverse[:, 2] -= (x0, y0)
    footprint = cv2.warpAffine(np.ones((h, w), np.float32), inverse, (x1 - x0, y1 - y0),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    footprint = cv2.erode(footprint, np.ones((2, 2), np.uint8))
    # Upstream's feathering: erode by 2 * w_edge, then blur with a (2 * w_edge + 1) Gaussian, w_edge
    # being a twentieth of the footprint's side (as sqrt of its area).
    w_edge = int(math.sqrt(float(footprint.sum()))) // 20
    centre = cv2.erode(footprint, np.ones((2 * w_edge, 2 * w_edge), np.uint8)) if w_edge else footprint
    k = 2 * w_edge + 1
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    soft = np.minimum(cv2.GaussianBlur(centre, (k, k), sigma), 1)  # kernel sums can round above 1
    return box, inverse, footprint, soft


def _footprint_box(inverse: np.ndarray, w: int, h: int, frame_shape: tuple[int, ...]) -> Box | None:
    """Frame-pixel box around the crop's warped footprint, with a zero border, clipped to the frame."""
    corners = np.array([[-1, -1, 1], [w, -1, 1], [-1, h, 1], [w, h, 1]], dtype=np.float64) @ inverse.T
    fh, fw = frame_shape[:2]
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, fw), min(y1, fh)
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)
