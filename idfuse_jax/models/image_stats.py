"""Per-channel image normalisation statistics of the pretrained encoders (no JAX import, so
that numpy-only code such as the ONNX segmenter can use them too)."""

# OpenAI CLIP's (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD); OpenCLIP uses the same.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's (transformers' IMAGENET_DEFAULT_MEAN / STD): DINO ViTs and most segmenters.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
