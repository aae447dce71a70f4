"""Explicit decoupling, prepared once per subject: subject masks M_i and backgrounds x'_i.

  python -m idfuse_jax.prepare data/dreambooth/dog --out runs/dog/prepared

Modules, one concern each:
  masks       where masks come from: given, GrabCut seeded from the border or from a saliency
              map (DINO attention, a centre prior), an ONNX model; mask geometry (dilation)
  saliency    a DINO ViT's CLS attention as a saliency map (needs JAX; lazy)
  checks      collapse detection: coverage floor and ceiling, slivers
  inpaint     backgrounds: OpenCV Telea (offline default), or 'sd'
  sd_inpaint  a Stable Diffusion inpainting model run with our UNet (needs JAX; lazy)
  keys        what identifies a method's settings in the cache key
  run         the cached run over a folder: outputs, manifest (per photo: mask source,
              coverage, retries, accepted or not and why), preview (rejected photos in red)
  __main__    the command line
"""

from idfuse_jax.prepare.checks import MaskCheck
from idfuse_jax.prepare.inpaint import INPAINTERS, Inpainter, Telea, make_inpainter
from idfuse_jax.prepare.masks import (
    CENTRE_PRIOR,
    MASK_SOURCES,
    CentrePrior,
    GrabCut,
    OnnxSegmenter,
    SaliencyGrabCut,
    Segmenter,
    dilate,
    dilation_pixels,
    make_segmenter,
)
from idfuse_jax.prepare.run import (
    MANIFEST,
    PREVIEW,
    PrepareResult,
    choose_mask,
    explicit_decoupling,
    prepare_dreambench,
    prepare_subject,
    rejection_reasons,
)

__all__ = [
    "CENTRE_PRIOR",
    "INPAINTERS",
    "MANIFEST",
    "MASK_SOURCES",
    "PREVIEW",
    "CentrePrior",
    "GrabCut",
    "Inpainter",
    "MaskCheck",
    "OnnxSegmenter",
    "PrepareResult",
    "SaliencyGrabCut",
    "Segmenter",
    "Telea",
    "choose_mask",
    "dilate",
    "dilation_pixels",
    "explicit_decoupling",
    "make_inpainter",
    "make_segmenter",
    "prepare_dreambench",
    "prepare_subject",
    "rejection_reasons",
]
