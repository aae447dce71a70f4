"""Collapse detection: is a subject mask plausible enough to build a background from?

A failed segmentation gives a background x'_i that still shows the subject (a mask that is
nearly empty) or shows nothing of the scene (a mask that is nearly everything); L3 and L4 would
then pull the wrong way. Such an image is retried with another seeding and, if still bad,
trains without explicit decoupling (see `run.prepare_subject` and the manifest).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskCheck:
    """Bounds for a plausible subject mask; calling it gives the reason a mask fails, or None.

    - coverage (the fraction of the photo the mask covers) in [floor, ceiling];
    - the largest connected part is not a sliver: its mean thickness, area / the longer side
      of its bounding box (a rectangle's shorter side; about the width of a thin diagonal
      strip), is at least `min_thickness` x the photo's shorter side.
    """

    floor: float = 0.05
    ceiling: float = 0.95
    min_thickness: float = 0.05

    @property
    def key(self) -> str:
        return f"check(floor={self.floor},ceiling={self.ceiling},thickness={self.min_thickness})"

    def __call__(self, mask: np.ndarray) -> str | None:
        coverage = float(np.mean(mask > 0))
        if coverage < self.floor:
            return f"coverage {coverage:.1%} under the {self.floor:.0%} floor"
        if coverage > self.ceiling:
            return f"coverage {coverage:.1%} over the {self.ceiling:.0%} ceiling"
        thickness = largest_part_thickness(mask) / min(mask.shape)
        if thickness < self.min_thickness:
            return (
                f"largest part is a sliver ({thickness:.1%} of the shorter side thick, under "
                f"{self.min_thickness:.0%})"
            )
        return None


def largest_part_thickness(mask: np.ndarray) -> float:
    """Mean thickness in pixels of the largest 8-connected part: area / its bounding box's
    longer side (0 for an empty mask)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), 8)
    if count <= 1:
        return 0.0
    part = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]
    longer = max(part[cv2.CC_STAT_WIDTH], part[cv2.CC_STAT_HEIGHT])
    return float(part[cv2.CC_STAT_AREA]) / float(longer)
