r"""`prepare`'s mask sources scored against the truth: the world's exact masks.

  python -m idfuse_jax.evaluation.mask_truth --resolution 32 [--dino VIT_FOLDER]

(--dino: the shipped world ViT, `assets.WORLD_VIT`, unless given.)

Every ToyBench photo (`data.world.SUBJECTS`, one photo per place) is segmented by each source
and compared with its exact mask by IoU. A source segments the world when its mean IoU is at
least `GOOD_MEAN` and at least `GOOD_SHARE` of the photos reach `GOOD_IOU`: a segmenter that
ignores the photo (the centre rectangle) fails that, where a test with boxes read off photos by
eye and a coverage floor does not. Sources that may decline (the centre prior's "no confident
mask") are scored on what they answer, and their declines are counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from idfuse_jax.data import world
from idfuse_jax.prepare.checks import MaskCheck
from idfuse_jax.prepare.masks import iou

GOOD_IOU = 0.8
GOOD_MEAN = 0.85
GOOD_SHARE = 0.9


@dataclasses.dataclass(frozen=True)
class MaskScore:
    """A mask source over a set of photos: IoU per answered photo, and the photos declined."""

    name: str
    ious: tuple[float, ...]
    declined: int
    rejected: int  # answered masks the collapse check (MaskCheck) rejects

    @property
    def mean(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    @property
    def share_good(self) -> float:
        return float(np.mean(np.asarray(self.ious) >= GOOD_IOU)) if self.ious else 0.0

    @property
    def segments_the_world(self) -> bool:
        return self.mean >= GOOD_MEAN and self.share_good >= GOOD_SHARE

    def row(self) -> str:
        return (
            f"| {self.name} | {self.mean:.3f} | {min(self.ious, default=0):.3f} | "
            f"{self.share_good:.0%} | {self.declined} | {self.rejected} | "
            f"{'yes' if self.segments_the_world else 'no'} |"
        )


HEADER = (
    f"| source | mean IoU | min IoU | IoU >= {GOOD_IOU} | declined | rejected by check | "
    "segments the world |\n|---|---|---|---|---|---|---|"
)


def truth_scenes(res: int, seed: int = 0) -> list[world.Scene]:
    """Every ToyBench photo with its exact mask."""
    return [scene for s in world.SUBJECTS for scene in world.subject_photos(s, res, seed)]


def score_source(
    name: str,
    segmenter: Callable[[np.ndarray], np.ndarray | None],
    scenes: Sequence[world.Scene],
    check: MaskCheck | None = None,
) -> MaskScore:
    """IoU of `segmenter`'s mask against each scene's exact mask (None answers: declined)."""
    check = check or MaskCheck()
    ious, declined, rejected = [], 0, 0
    for scene in scenes:
        mask = segmenter(scene.image)
        if mask is None:
            declined += 1
            continue
        ious.append(iou(mask, scene.mask))
        rejected += check(mask) is not None
    return MaskScore(name, tuple(ious), declined, rejected)


def centre_rectangle(image: np.ndarray) -> np.ndarray:
    """A segmenter that ignores the photo: the middle half of each side."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h - h // 4, w // 4 : w - w // 4] = 1
    return mask


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from idfuse_jax.assets import WORLD_VIT
    from idfuse_jax.prepare import CENTRE_PRIOR, GrabCut, make_segmenter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument(
        "--dino", default=str(WORLD_VIT), help="a transformers ViTModel folder for masks='dino'"
    )
    args = parser.parse_args(argv)
    scenes = truth_scenes(args.resolution)
    sources = {
        "grabcut (border)": GrabCut(),
        "centre prior": CENTRE_PRIOR,
        "dino (the world's ViT)": make_segmenter("dino", dino_model=args.dino),
        "centre rectangle (ignores the photo)": centre_rectangle,
    }
    print(f"{len(scenes)} ToyBench photos at {args.resolution} px\n\n{HEADER}")
    for name, segmenter in sources.items():
        print(score_source(name, segmenter, scenes).row())


if __name__ == "__main__":
    main()
