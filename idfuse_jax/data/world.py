"""A procedural world small enough to learn on a CPU, with the truth known (numpy only).

A scene is one object on one background "place". An object is an instance: a shape (its class:
ball, box, cone, star, diamond), a saturated body colour and a pattern drawn in black (plain,
striped, checked, belted). A place is a textured background of known colours (sand, snow,
grass, water, brick, wood, fabric, road). Everything is drawn with hard edges at the requested
resolution, so the mask is exact and the background is exactly the scene without the object.

Captions read "a red striped ball on sand". Every colour of the world is one of a few known
palette colours plus a little noise and lighting, which is what makes the ToyBench scores
(`idfuse_jax.evaluation.toybench`) near exact: a pixel's nearest palette colour says what it is.

ToyBench: `SUBJECTS` are specific instances, each photographed on `PHOTOS` places
(`write_toybench` writes a DreamBooth-layout folder with `prompts_and_classes.txt`, and the
exact masks and backgrounds beside it). Pretraining data (`world_batch`) never shows a
subject's exact instance, so only fine-tuning can teach it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from idfuse_jax import paths
from idfuse_jax.data.images import BACKGROUNDS_DIR, MASKS_DIR
from idfuse_jax.errors import DataError
from idfuse_jax.types import PathLike

SHAPES = ("ball", "box", "cone", "star", "diamond")
COLOURS = {  # saturated body colours, each far from every place's palette
    "red": (230, 30, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 30),
    "purple": (125, 45, 205),
    "cyan": (20, 210, 220),
    "magenta": (215, 30, 195),
}
PATTERN_COLOUR = (20, 20, 20)
PATTERNS = ("plain", "striped", "checked", "belted")
PLACES = {  # name: (caption phrase, palette: base colour first, then the texture's colours)
    "sand": ("on sand", ((214, 190, 140), (192, 166, 116))),
    "snow": ("in the snow", ((240, 243, 248), (205, 216, 232))),
    "grass": ("on grass", ((70, 150, 50), (40, 105, 35))),
    "water": ("on water", ((40, 100, 180), (75, 145, 215))),
    "brick": ("in front of a brick wall", ((165, 60, 45), (150, 150, 150))),
    "wood": ("on a wooden floor", ((178, 122, 66), (130, 82, 44))),
    "fabric": ("on pink fabric", ((240, 160, 200), (218, 128, 178))),
    "road": ("on a road", ((95, 95, 100), (68, 68, 73))),
}
MARGIN = 0.1  # a border band (fraction of the side) that objects never enter
NOISE = 5.0  # per-pixel grain, in 8-bit levels


@dataclasses.dataclass(frozen=True)
class Instance:
    """One object instance: the identity a subject is made of."""

    shape: str
    colour: str
    pattern: str

    def __post_init__(self):
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.colour, tuple(COLOURS), "colour"),
            (self.pattern, PATTERNS, "pattern"),
        ):
            if value not in allowed:
                raise DataError(f"unknown {what} {value!r}; one of {', '.join(allowed)}")

    @property
    def words(self) -> str:
        """'red striped ball' ('red ball' when plain)."""
        pattern = "" if self.pattern == "plain" else f" {self.pattern}"
        return f"{self.colour}{pattern} {self.shape}"


ALL_INSTANCES = tuple(Instance(*t) for t in itertools.product(SHAPES, COLOURS, PATTERNS))


@dataclasses.dataclass(frozen=True)
class ToySubject:
    """A ToyBench subject: an instance and the places of its photos (one photo per place)."""

    name: str
    instance: Instance
    places: tuple[str, ...]


def _subject(shape: str, colour: str, pattern: str, places: str) -> ToySubject:
    name = f"{colour}_{pattern}_{shape}"
    return ToySubject(name, Instance(shape, colour, pattern), tuple(places.split()))


# Eight subjects covering every shape, colour and pattern; each seen on 5 of the 8 places, so 3
# places per subject are new contexts (where background leakage is measured).
SUBJECTS = (
    _subject("ball", "red", "striped", "sand grass brick wood road"),
    _subject("box", "yellow", "checked", "snow water brick fabric road"),
    _subject("cone", "cyan", "plain", "sand snow grass wood fabric"),
    _subject("star", "orange", "belted", "water brick wood fabric road"),
    _subject("diamond", "purple", "striped", "sand snow water grass road"),
    _subject("ball", "magenta", "checked", "snow grass brick wood fabric"),
    _subject("box", "orange", "plain", "sand water brick fabric road"),
    _subject("cone", "red", "belted", "sand snow grass water wood"),
)
SUBJECT_INSTANCES = frozenset(s.instance for s in SUBJECTS)
PHOTOS = 5
# config.data.instance_dir "world:NAME" trains ToyBench subject NAME, rendered in-process.
PREFIX = "world:"


def toy_subject(name: str) -> ToySubject:
    """The ToyBench subject called `name` (DataError naming the known ones otherwise)."""
    for subject in SUBJECTS:
        if subject.name == name:
            return subject
    raise DataError(f"no ToyBench subject {name!r}; one of {', '.join(s.name for s in SUBJECTS)}")


def caption(instance: Instance, place: str, token: str | None = None) -> str:
    """'a red striped ball on sand'; with a token, DreamBooth's 'a sks ball on sand'."""
    what = instance.words if token is None else f"{token} {instance.shape}"
    article = "an" if what[0] in "aeiou" else "a"
    return f"{article} {what} {PLACES[place][0]}"


def place_of(prompt: str) -> str | None:
    """The place a prompt asks for (its caption phrase at the end), or None."""
    for name, (phrase, _) in PLACES.items():
        if prompt.rstrip(". ").endswith(phrase):
            return name
    return None


# --------------------------------------------------------------------------------------------
# Drawing


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [0, 1]."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    return (yy + 0.5) / res, (xx + 0.5) / res


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The shape in its own frame: u right, v down, both in [-1, 1] over its bounding box."""
    if shape == "ball":
        return u * u + v * v <= 1
    if shape == "box":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "cone":  # apex up
        return (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "star":  # five points, one up: inside the pentagram's outline
        angle = np.arctan2(u, -v)
        r = np.hypot(u, v)
        sector = np.mod(angle, 2 * np.pi / 5) - np.pi / 5
        inner = 0.45  # inner radius: where two points meet
        # The outline between a point (r=1 at sector 0) and a notch (r=inner at +-pi/5).
        t = np.abs(sector) / (np.pi / 5)
        return r <= 1 / (1 + t * (1 / inner - 1))
    raise DataError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern's black falls, in the object's frame (see `shape_mask`)."""
    if pattern == "plain":
        return np.zeros(u.shape, bool)
    if pattern == "striped":  # five vertical bands, the 2nd and 4th black
        return np.floor((u + 1) * 2.5).astype(int) % 2 == 1
    if pattern == "checked":  # 3 x 3 checks, corners and centre coloured
        return (np.floor((u + 1) * 1.5) + np.floor((v + 1) * 1.5)).astype(int) % 2 == 1
    if pattern == "belted":  # one horizontal band through the middle
        return np.abs(v) < 0.22
    raise DataError(f"unknown pattern {pattern!r}; one of {', '.join(PATTERNS)}")


def draw_place(place: str, res: int, rng: np.random.Generator) -> np.ndarray:
    """A place's background, uint8 [res, res, 3]: its texture in its palette colours, under a
    gentle lighting gradient, with grain."""
    if place not in PLACES:
        raise DataError(f"unknown place {place!r}; one of {', '.join(PLACES)}")
    base, second = (np.array(c, np.float32) for c in PLACES[place][1])
    yy, xx = _grid(res)
    if place == "sand":  # diagonal ripples
        t = np.sin(2 * np.pi * (rng.uniform(3, 5) * (xx + 0.6 * yy) + rng.uniform()))
        t = (t > 0.6).astype(np.float32)
    elif place == "snow":  # soft drifts
        t = np.zeros_like(xx)
        for cy, cx, r in rng.uniform((0, 0, 0.1), (1, 1, 0.25), size=(3, 3)):
            t = np.maximum(t, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        t = (t > 0.5).astype(np.float32)
    elif place == "grass":  # vertical blades
        cols = rng.random(res) < 0.35
        t = np.broadcast_to(cols[None, :], (res, res)).astype(np.float32)
        t = t * (rng.random((res, res)) < 0.8)
    elif place == "water":  # horizontal wave crests
        t = np.sin(2 * np.pi * (rng.uniform(4, 6) * yy + 0.08 * np.sin(6 * np.pi * xx)))
        t = (t > 0.55).astype(np.float32)
    elif place == "brick":  # running bond, grey mortar
        rows = 5
        row = np.floor(yy * rows)
        shift = (row % 2) * 0.5 / 3
        mortar_h = (yy * rows) % 1 < 0.18
        mortar_v = ((xx + shift) * 3) % 1 < 0.06
        t = (mortar_h | mortar_v).astype(np.float32)
    elif place == "wood":  # planks with dark seams and grain
        planks = 4
        seam = (yy * planks) % 1 < 0.12
        grain = np.sin(2 * np.pi * (yy * 19 + 0.3 * np.sin(2 * np.pi * xx * 2 + rng.uniform())))
        t = (seam | (grain > 0.85)).astype(np.float32)
    elif place == "fabric":  # a fine weave
        n = max(2, res // 4)
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    else:  # road: asphalt speckle
        t = (rng.random((res, res)) < 0.3).astype(np.float32)
    scene = base + t[..., None] * (second - base)
    angle = rng.uniform(0, 2 * np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)  # in [-1.5, 1.5]
    light = 1 + rng.uniform(-0.04, 0.04) * along
    scene = scene * light[..., None] + rng.normal(0, NOISE, scene.shape)
    return np.clip(np.round(scene), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Pose:
    """Where the object sits: centre (y, x) and half-size, as fractions of the side."""

    cy: float
    cx: float
    half: float


def random_pose(rng: np.random.Generator) -> Pose:
    """A pose keeping the object inside the border band (MARGIN)."""
    half = rng.uniform(0.2, 0.3)
    lo, hi = MARGIN + half, 1 - MARGIN - half
    cy, cx = rng.uniform(lo, hi, size=2)
    return Pose(float(cy), float(cx), float(half))


def draw_object(instance: Instance, pose: Pose, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The object's colours (uint8 [res, res, 3], meaningful under the mask) and its exact mask
    (uint8 [res, res] in {0, 1}): the shape tested at pixel centres."""
    yy, xx = _grid(res)
    u, v = (xx - pose.cx) / pose.half, (yy - pose.cy) / pose.half
    mask = shape_mask(instance.shape, u, v)
    black = pattern_mask(instance.pattern, u, v)
    colour = np.where(
        black[..., None],
        np.array(PATTERN_COLOUR, np.uint8),
        np.array(COLOURS[instance.colour], np.uint8),
    )
    return colour.astype(np.uint8), mask.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One rendered scene and its truth."""

    image: np.ndarray  # uint8 [R, R, 3]
    mask: np.ndarray  # uint8 [R, R] in {0, 1}
    background: np.ndarray  # uint8 [R, R, 3]: the image without the object
    instance: Instance
    place: str
    caption: str


def render(
    instance: Instance, place: str, res: int, rng: np.random.Generator, pose: Pose | None = None
) -> Scene:
    """The instance on the place, at a random pose unless given; grain also on the object."""
    if res < 16:
        raise DataError(f"resolution must be at least 16 px, got {res}")
    background = draw_place(place, res, rng)
    pose = pose if pose is not None else random_pose(rng)
    colour, mask = draw_object(instance, pose, res)
    grain = rng.normal(0, NOISE, colour.shape)
    colour = np.clip(np.round(colour + grain), 0, 255).astype(np.uint8)
    image = np.where(mask[..., None] > 0, colour, background)
    return Scene(image, mask, background, instance, place, caption(instance, place))


def world_batch(
    count: int, res: int, seed: int, *, exclude: frozenset[Instance] = SUBJECT_INSTANCES
) -> list[Scene]:
    """`count` random scenes for pretraining: any instance but `exclude` (the ToyBench subjects'
    own, by default), any place. Scene i depends only on (seed, i)."""
    allowed = [i for i in ALL_INSTANCES if i not in exclude]
    places = tuple(PLACES)
    scenes = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        instance = allowed[int(rng.integers(len(allowed)))]
        scenes.append(render(instance, places[int(rng.integers(len(places)))], res, rng))
    return scenes


def subject_photos(subject: ToySubject, res: int, seed: int = 0) -> list[Scene]:
    """The subject's photos: one per place of `subject.places`, seeded by (seed, subject, i)."""
    index = next((k for k, s in enumerate(SUBJECTS) if s.name == subject.name), len(SUBJECTS))
    return [
        render(subject.instance, place, res, np.random.default_rng([seed, 1000 + index, i]))
        for i, place in enumerate(subject.places)
    ]


# --------------------------------------------------------------------------------------------
# ToyBench on disk

TRUTH_FILE = "toybench.json"


def prompts_file_text(subjects: Sequence[ToySubject]) -> str:
    """`prompts_and_classes.txt` in DreamBench's layout: one prompt per place, for both kinds."""
    lines = ["Classes", "", "subject_name,class"]
    lines += [f"{s.name},{s.instance.shape}" for s in subjects]
    prompts = [
        f"'a {{0}} {{1}} {phrase}'.format(unique_token, class_token),"
        for phrase, _ in PLACES.values()
    ]
    prompts[-1] = prompts[-1].rstrip(",")
    block = ["prompt_list = [", *prompts, "]"]
    lines += ["", "Prompts", "", "Object Prompts", "", *block, "", "Live Subject Prompts", ""]
    return "\n".join([*lines, *block, ""])


def write_toybench(
    root: PathLike,
    res: int,
    *,
    seed: int = 0,
    subjects: Sequence[ToySubject] = SUBJECTS,
    truth_dir: PathLike | None = None,
) -> pathlib.Path:
    """ToyBench as a DreamBench-layout folder: ROOT/SUBJECT/NN.png, prompts_and_classes.txt and
    toybench.json (each subject's instance and photo places). The exact masks and backgrounds go
    to `truth_dir` (default ROOT/truth) as TRUTH/SUBJECT/{masks,backgrounds}/NN.png, the layout
    `idfuse_jax.prepare` writes, so `--prepared` can point at them. Returns ROOT."""
    root = pathlib.Path(root)
    truth = pathlib.Path(truth_dir) if truth_dir is not None else root / "truth"
    record = {"resolution": res, "seed": seed, "subjects": {}}
    for subject in subjects:
        for i, scene in enumerate(subject_photos(subject, res, seed)):
            name = f"{i:02d}.png"
            paths.save_png(root / subject.name / name, scene.image)
            paths.save_png(truth / subject.name / MASKS_DIR / name, scene.mask * 255)
            paths.save_png(truth / subject.name / BACKGROUNDS_DIR / name, scene.background)
        record["subjects"][subject.name] = {
            **dataclasses.asdict(subject.instance),
            "places": list(subject.places),
        }
    (root / "prompts_and_classes.txt").write_text(prompts_file_text(subjects), encoding="utf-8")
    (root / TRUTH_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return root


def read_truth(root: PathLike) -> dict[str, ToySubject]:
    """The subjects recorded in a ToyBench folder's toybench.json."""
    path = pathlib.Path(root) / TRUTH_FILE
    if not path.is_file():
        raise DataError(f"{path}: not a ToyBench folder (no {TRUTH_FILE}; see write_toybench)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {
            name: ToySubject(
                name, Instance(s["shape"], s["colour"], s["pattern"]), tuple(s["places"])
            )
            for name, s in record["subjects"].items()
        }
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed ToyBench record ({e})") from None


def contact_sheet(images: Sequence[np.ndarray], columns: int, scale: int = 1) -> np.ndarray:
    """Images (same size) tiled in rows of `columns`, 1 px apart, each upscaled `scale` x."""
    tiles = [np.kron(im, np.ones((scale, scale, 1), np.uint8)) for im in images]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        sheet[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tile
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    """python -m idfuse_jax.data.world --out DIR [--resolution 32]: write ToyBench and a
    contact sheet of its photos (DIR/subjects.png, one row per subject)."""
    import argparse

    parser = argparse.ArgumentParser(description="Write ToyBench (a DreamBench-layout folder).")
    parser.add_argument("--out", required=True, help="the ToyBench folder to write")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_toybench(args.out, args.resolution, seed=args.seed)
    photos = [s.image for sub in SUBJECTS for s in subject_photos(sub, args.resolution, args.seed)]
    scale = max(1, 128 // args.resolution)
    paths.save_png(root / "subjects.png", contact_sheet(photos, PHOTOS, scale))
    print(f"wrote {len(SUBJECTS)} subjects to {root} (contact sheet: {root / 'subjects.png'})")


if __name__ == "__main__":
    main()
