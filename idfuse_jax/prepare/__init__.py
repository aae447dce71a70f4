"""Explicit decoupling, prepared once per subject: subject masks M_i and backgrounds x'_i.

  python -m idfuse_jax.prepare data/dreambooth/dog --out runs/dog/prepared

Modules, one concern each:
  masks       where masks come from: given, GrabCut seeded from the border, an ONNX model;
              the mask geometry helpers (dilation, resizing)
  inpaint     backgrounds: OpenCV Telea (offline default), or 'sd'
  sd_inpaint  a Stable Diffusion inpainting model run with our UNet (needs JAX; lazy)
  run         the cached run over a folder: outputs, manifest, preview
  __main__    the command line
"""

from idfuse_jax.prepare.inpaint import INPAINTERS, Inpainter, Telea, make_inpainter
from idfuse_jax.prepare.masks import (
    MASK_SOURCES,
    GrabCut,
    OnnxSegmenter,
    Segmenter,
    dilate,
    dilation_pixels,
    make_segmenter,
)
from idfuse_jax.prepare.run import (
    MANIFEST,
    PREVIEW,
    PrepareResult,
    prepare_dreambench,
    prepare_subject,
)

__all__ = [
    "INPAINTERS",
    "MANIFEST",
    "MASK_SOURCES",
    "PREVIEW",
    "GrabCut",
    "Inpainter",
    "OnnxSegmenter",
    "PrepareResult",
    "Segmenter",
    "Telea",
    "dilate",
    "dilation_pixels",
    "make_inpainter",
    "make_segmenter",
    "prepare_dreambench",
    "prepare_subject",
]
