"""Time per photo of the SD-inpainting background path (`--inpaint sd`), our UNet and VAE.

  python benchmarks/bench_sd_inpaint.py                      # a tiny random inpainting model
  python benchmarks/bench_sd_inpaint.py --model FOLDER       # a real SD inpainting pipeline

Runs `prepare`'s SDInpainter on DreamBench photos (their GrabCut masks) and reports the load +
compile time of the first photo and the median time of the others. The tiny model is built at
random with diffusers (the `test` extra) and saved with save_pretrained, and run at 64 px; its
numbers measure the pipeline's overhead (VAE, 50 DDIM steps with guidance, resizing), not a
real model's cost.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DREAMBOOTH = REPO.parent / "shared" / "data" / "dreambooth"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="SD inpainting pipeline folder (default: tiny)")
    p.add_argument("--subject", default=str(DREAMBOOTH / "dog"), help="a subject folder")
    p.add_argument(
        "--size", type=int, default=0, help="working long side (default 512; tiny model: 64)"
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--photos", type=int, default=4)
    args = p.parse_args()
    # The tiny model's VAE downsamples only 2x: at 512 px its attention would not fit in memory.
    args.size = args.size or (512 if args.model else 64)

    from idfuse_jax.data import list_images, read_image
    from idfuse_jax.prepare import GrabCut
    from idfuse_jax.prepare.sd_inpaint import SDInpainter

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if not folder:
            sys.path.insert(0, str(REPO / "tests"))
            from parity_utils import tiny_sd_inpainting

            folder, _ = tiny_sd_inpainting(pathlib.Path(tmp), args.size)
        photos = [read_image(p) for p in list_images(pathlib.Path(args.subject))[: args.photos]]
        masks = [GrabCut()(x) for x in photos]
        start = time.perf_counter()
        inpainter = SDInpainter(folder, steps=args.steps, size=args.size)
        inpainter(photos[0], masks[0])
        first = time.perf_counter() - start
        times = []
        for photo, mask in zip(photos[1:], masks[1:]):
            start = time.perf_counter()
            inpainter(photo, mask)
            times.append(time.perf_counter() - start)
    model = args.model or "tiny random model"
    print(f"{model}: size {args.size}, {args.steps} steps, guidance {inpainter.guidance_scale}")
    print(f"first photo (load + compile + run): {first:.1f} s")
    print(f"per photo after that: median {statistics.median(times):.2f} s over {len(times)}")


if __name__ == "__main__":
    main()
