"""Face landmarks with MediaPipe FaceMesh, and the three points LatentSync aligns on.

mediapipe 0.10.21 is the last release whose legacy ``solutions`` ship their .tflite models inside the
wheel, so this works offline. FaceMesh's own detector is short-range (faces near the camera), and
feeding it a whole 1080x1920 frame costs 11 ms (video) to 20 ms (stills) a frame, against ~4 ms for a crop
around the face. So we find the face with the full-range detector on a downscaled frame, run FaceMesh on a
square crop around it, and follow the face with that crop, recentred on the last landmarks every frame.

Which landmarks make LatentSync's three alignment points is the config's choice (``face.landmarks``):
see stream/alignment_points.py.
"""

from __future__ import annotations

import cv2
import numpy as np
from mediapipe.python.solutions.face_detection import FaceDetection
from mediapipe.python.solutions.face_mesh import FaceMesh

from stream.alignment_points import MAPPINGS, AlignmentPoints

# The crop FaceMesh sees is this many face sizes wide: its short-range detector wants a large face.
CROP_SCALE = 2.0
# The full-range detector works on a 192x192 input; a larger copy only costs conversion time.
DETECT_LONG_SIDE = 384
MIN_CROP = 64


class FaceLandmarker:
    """Finds one face per image (the largest when acquiring) and returns its 468 FaceMesh landmarks.

    With ``static_image=False`` (streams) the face is tracked from frame to frame: feed frames in order.
    With ``static_image=True`` every call is independent. ``mapping`` picks the landmarks behind
    ``alignment_points``; the pipeline passes its config's, the default serves callers that only ask
    whether there is a face.
    """

    def __init__(
        self,
        static_image: bool = False,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        mapping: AlignmentPoints = MAPPINGS["insightface106"],
    ) -> None:
        self.static_image = static_image
        self.mapping = mapping
        self._mesh = FaceMesh(
            static_image_mode=static_image,
            max_num_faces=1,
            refine_landmarks=False,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        self._detector = FaceDetection(model_selection=1, min_detection_confidence=min_detection_confidence)
        self._box: tuple[int, int, int, int] | None = None  # crop (x0, y0, x1, y1) to look in next

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """(468, 2) float64 landmark pixels in ``rgb``, or None when no face is found."""
        if self.static_image:
            self._box = None
        acquired = self._box is None
        if acquired:
            self._box = self._detect(rgb)
            if self._box is None:
                return None
        points = self._mesh_in(rgb, self._box)
        if points is None and not acquired:
            self._box = self._detect(rgb)
            points = None if self._box is None else self._mesh_in(rgb, self._box)
        if points is None:
            self._box = None
            return None
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        self._box = _square_box((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * CROP_SCALE, rgb.shape)
        return points

    def alignment_points(self, rgb: np.ndarray) -> np.ndarray | None:
        """(3, 2) float64: image-left brow centre, image-right brow centre, nose; None without a face."""
        points = self.landmarks(rgb)
        return None if points is None else self.mapping(points)

    def reset(self) -> None:
        """Forget the tracked face (a new stream starts)."""
        self._box = None
        self._mesh.reset()

    def close(self) -> None:
        """Release the mediapipe graphs; safe to call again."""
        for graph in (self._mesh, self._detector):
            if graph._graph is not None:  # mediapipe raises on a second close
                graph.close()

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _detect(self, rgb: np.ndarray) -> tuple[int, int, int, int] | None:
        h, w = rgb.shape[:2]
        scale = min(1.0, DETECT_LONG_SIDE / max(h, w))
        small = rgb if scale == 1.0 else cv2.resize(
            rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
        )
        detections = self._detector.process(small).detections
        if not detections:
            return None
        boxes = [d.location_data.relative_bounding_box for d in detections]
        b = max(boxes, key=lambda b: b.width * b.height)
        size = max(b.width * w, b.height * h) * CROP_SCALE
        return _square_box((b.xmin + b.width / 2) * w, (b.ymin + b.height / 2) * h, size, rgb.shape)

    def _mesh_in(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
        x0, y0, x1, y1 = box
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        faces = self._mesh.process(crop).multi_face_landmarks
        if not faces:
            return None
        points = np.array([(p.x, p.y) for p in faces[0].landmark], dtype=np.float64)
        return points * (x1 - x0, y1 - y0) + (x0, y0)


def _square_box(cx: float, cy: float, size: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A square of side ``size`` around (cx, cy), slid (not cut) to stay inside the image where it fits."""
    h, w = shape[:2]
    size = max(round(size), MIN_CROP)
    side_w, side_h = min(size, w), min(size, h)
    x0 = int(np.clip(round(cx - side_w / 2), 0, w - side_w))
    y0 = int(np.clip(round(cy - side_h / 2), 0, h - side_h))
    return x0, y0, x0 + side_w, y0 + side_h
