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


def tiny_sd_inpainting(root, sample_side: int = 16):
    """A tiny random Stable Diffusion inpainting pipeline (UNet in_channels 9) saved with
    save_pretrained under root/pipe, as real pipelines ship. Returns (folder, diffusers pipe)."""
    import shutil

    import diffusers
    import torch
    import transformers
    from test_tokenizer import write_tokenizer

    tok_dir = write_tokenizer(root / "tok", pad_token="<|endoftext|>")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        sample_size=sample_side,
    )  # fmt: skip
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # real pipelines ship them; transformers 5 may not
        if not (root / "pipe" / "tokenizer" / name).exists():
            shutil.copy(tok_dir / name, root / "pipe" / "tokenizer" / name)
    return root / "pipe", pipe
