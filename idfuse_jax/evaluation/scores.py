"""DreamBench metrics as pure functions of features (numpy in, numpy out).

The protocol of the DreamBooth paper (Ruiz et al. 2023, section 4.1): DINO is the mean cosine
similarity between the DINO ViT-S/16 CLS features of generated and real images of the subject;
CLIP-I the same with CLIP image embeddings; CLIP-T the mean cosine between a generated image's
CLIP image embedding and its prompt's CLIP text embedding. Any method's images can be scored
with these functions, given the features.
"""

from __future__ import annotations

import numpy as np


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64."""
    f = np.asarray(features, np.float64)
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] cosine similarities of every row of `a` with every row of `b`."""
    return normalize(a) @ normalize(b).T


def image_similarity(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Per generated image: its mean cosine similarity with every real image [N_gen].

    DINO with DINO CLS features, CLIP-I with CLIP image embeddings; the subject's score is the
    mean over its generated images (every pair counts once).
    """
    return cosine_matrix(generated, real).mean(axis=1)


def text_similarity(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """CLIP-T per image: cosine of image i's embedding with its prompt's, row i of each [N]."""
    if len(image_embeds) != len(text_embeds):
        raise ValueError(f"{len(image_embeds)} image embeddings but {len(text_embeds)} texts")
    return np.sum(normalize(image_embeds) * normalize(text_embeds), axis=-1)


def real_similarity(real: np.ndarray) -> np.ndarray:
    """The "real images" baseline, per real image: mean cosine with every *other* real image.

    The subject's score (the mean of these) is the mean over ordered pairs i != j.
    """
    n = len(real)
    if n < 2:
        raise ValueError("the real-image baseline needs at least 2 images")
    sims = cosine_matrix(real, real)
    return (sims.sum(axis=1) - np.diag(sims)) / (n - 1)
