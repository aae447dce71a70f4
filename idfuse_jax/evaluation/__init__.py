"""DreamBench evaluation (DINO, CLIP-I, CLIP-T), one concern per module:

  preprocess  transformers' image processors (ViT, CLIP) in numpy/PIL
  scores      the metrics: features in, scores out (pure numpy)
  encoders    the metric models (DINO ViT, CLIP towers and tokenizer) loaded from their folders
  subjects    what to evaluate: trained workdirs or an image folder, prompts, real images
  generation  per-image seeds, sharded generation, resumable image files
  report      results.json, results.md beside the published numbers, grids
  run         an evaluation from start to end (what the command line runs)
  comparison  several methods' evaluations: bootstrap intervals, paired differences, plots

`python -m idfuse_jax.evaluate` (idfuse_jax/evaluate.py) is the command line over `run`;
`python -m idfuse_jax.compare` (idfuse_jax/compare.py) the one over `run` and `comparison`.
"""
