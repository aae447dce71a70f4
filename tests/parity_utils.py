"""Helpers shared by the parity tests (importable: pytest puts tests/ on sys.path)."""

import numpy as np


def rel_err(ours, ref) -> float:
    """Max abs error divided by the reference's scale (its max abs value)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def nchw_to_nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def perturb_torch_(model, seed: int = 0, scale: float = 0.1):
    """Add Gaussian noise to every parameter in place, so that zero biases and unit norms do not
    hide a mis-mapped tensor. Returns the model (in eval mode)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def meta_state_dict(model_cls, config) -> dict:
    """Full-size checkpoint stand-in: the model's state-dict keys with zero-strided float32
    arrays of the right shapes (no memory), built on torch's meta device."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    zero = np.zeros((), np.float32)
    return {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in model.state_dict().items()}
