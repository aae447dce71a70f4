"""Every field of an idfuse_jax training run, with its default and what it means.

Not meant to be run as is (it names no subject); `configs/dog.py` and `configs/tiny.py` start
from it. Any field can be overridden on the command line:

  python -m idfuse_jax.train --config configs/dog.py --workdir runs/dog \
      --config.train.steps=500 --config.mesh.fsdp=4

A key that is not listed here is an error (the config is locked).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # everything random (init, noise, timesteps, data order) derives from it
    c.multihost = False  # call jax.distributed.initialize() (TPU pods, multi-node GPUs)

    c.model = ml_collections.ConfigDict()
    # diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, text_encoder/,
    # tokenizer/, scheduler/). Empty: build random models of the `random` sizes (configs/smoke.py).
    c.model.pretrained = ""
    # transformers CLIPVisionModelWithProjection or CLIPModel folder: the image encoder E_I.
    c.model.image_encoder = ""
    # Weight-file variant of the pipeline's unet/ vae/ text_encoder/, as diffusers' `variant`:
    # "fp16" loads diffusion_pytorch_model.fp16.safetensors and model.fp16.safetensors (the
    # values are cast to model.weights_dtype on load). "" loads the plain files.
    c.model.variant = ""
    c.model.dtype = "bfloat16"  # compute dtype of UNet and CLIP (VAE: float32)
    # Storage dtype of the frozen UNet and CLIP weights: "" keeps float32; "bfloat16" halves
    # their memory (the compute casts them to model.dtype anyway; the LoRA branch stays apart).
    c.model.weights_dtype = ""
    c.model.remat = False  # rematerialise UNet blocks: less memory, ~30% more compute
    # Attention kernel of every model (idfuse_jax.models.attention): "auto" = cuDNN flash on GPU
    # (bf16/fp16), Pallas flash on TPU, "blockwise" (O(T x 128) memory flash in plain JAX)
    # elsewhere; or "xla" (materialised scores), "blockwise", "cudnn", "tpu_flash" by name.
    c.model.attention = "auto"
    # Sizes of the random models used when model.pretrained is empty.
    c.model.random = ml_collections.ConfigDict(
        dict(
            unet_channels=(32, 64),
            unet_heads=2,
            vae_channels=(32, 64),
            latent_channels=4,
            text_width=32,
            text_layers=2,
            image_width=32,
            image_layers=2,
            image_patch=8,
            image_size=32,
            projection_dim=32,
        )
    )

    c.data = ml_collections.ConfigDict()
    c.data.instance_dir = ""  # folder of subject photos, or "synthetic" (generated test subject)
    # Several subjects in one job (the subject axis): "" trains instance_dir alone; else
    # instance_dir holds one sub-folder per subject (DreamBooth layout) and this is "all" (every
    # subject of its prompts_and_classes.txt) or "NAME,NAME:CLASS,...". Outputs per subject go
    # to WORKDIR/subjects/NAME/. With instance_dir="synthetic" each NAME is its own synthetic
    # subject. configs/dreambench.py trains all 30 DreamBench subjects this way.
    c.data.subjects = ""
    c.data.synthetic_variant = 0  # which synthetic subject (set per name in multi-subject jobs)
    c.data.token = "sks"  # the rare identifier bound to the subject
    c.data.class_name = "dog"
    c.data.prompt = "a photo of {token} {class_name}"  # the identity prompt P
    c.data.resolution = 512  # training resolution (square, centre crop)
    c.data.min_size = 256  # smaller photos are refused
    c.data.random_flip = True  # horizontal flips, precomputed once per subject
    c.data.synthetic_images = 4  # images of the synthetic subject
    # Explicit decoupling (prepared once per subject, cached under the workdir):
    # auto: masks/ where present, else onnx if onnx_model is set, else dino if dino_model is
    # set, else grabcut (seeded from the border) | given | grabcut | dino | onnx
    c.data.masks = "auto"
    c.data.onnx_model = ""  # segmentation .onnx file for masks="onnx"
    c.data.dino_model = ""  # DINO ViT folder (transformers ViTModel) for masks="dino"
    c.data.inpaint = "telea"  # telea (OpenCV) | sd (SD inpainting model, in_channels 9)
    c.data.inpaint_model = ""  # diffusers SD inpainting pipeline folder for inpaint="sd"

    c.method = ml_collections.ConfigDict()
    # Which method trains (idfuse_jax/presets.py): idfuse | idfuse_no_explicit | idfuse_no_ffm |
    # idfuse_no_image_branch (the paper's ablations) | disenbooth | dreambooth_lora. The other
    # fields below apply to the parts the preset has.
    c.method.preset = "idfuse"
    c.method.background = "implicit"  # f_com = f_s + f_i (implicit) or f_s + f'_i (explicit)
    c.method.num_experts = 4  # FFM experts K
    c.method.expert_hidden_mult = 1  # expert MLP hidden width = mult x text width
    c.method.adapter_hidden_mult = 1  # adapter MLP hidden width = mult x image width
    c.method.lora_rank = 4
    c.method.lora_alpha = 4.0  # LoRA scale alpha / rank
    # Regular expressions over '/'-joined parameter paths; "" switches LoRA off for that model.
    c.method.unet_lora_targets = r".*attn[12]/(to_q|to_k|to_v|to_out_0)/kernel"
    c.method.text_lora_targets = r".*self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel"
    # Text-encoder LoRA: auto (the preset's choice: on for IdFuse and its ablations, off for
    # disenbooth and dreambooth_lora) | on | off.
    c.method.text_lora = "auto"

    # DreamBooth's prior preservation (any preset; meant for dreambooth_lora): before training,
    # the frozen model draws class_images images of prior.prompt (cached in WORKDIR/class_images/),
    # and each step adds weight x the denoising loss of a batch of them, conditioned on the
    # prompt's text path. 0 switches it off.
    c.prior = ml_collections.ConfigDict()
    c.prior.class_images = 0
    c.prior.weight = 1.0
    c.prior.prompt = "a photo of {class_name}"

    c.loss = ml_collections.ConfigDict()
    c.loss.text_only_weight = 0.01  # weak denoising with FFM(f_s) alone (the inference path)
    # L = Σ weights[k] L_k; each name is also the term's metric key (idfuse_jax/losses.py).
    c.loss.weights = ml_collections.ConfigDict()
    c.loss.weights.denoise = 1.0  # L1 = mse of the noise (or v) prediction
    c.loss.weights.text_image = 0.001  # L2 = cos(pool(f_s), f_i)
    c.loss.weights.image_background = 0.001  # L3 = -cos(f_i, f'_i)
    c.loss.weights.text_background = 0.001  # L4 = cos(pool(f_s), f'_i)
    c.loss.text_pool = "mean"  # mean over tokens (DisenBooth) | eos token
    # A loss-weight sweep in one program: "TERM=V1,V2,..." (TERM a name of loss.weights) trains
    # every subject once per value, each as its own slot of the subject axis, in
    # WORKDIR/subjects/NAME@TERM=V (one subject: WORKDIR/subjects/TERM=V). "" trains loss.weights.
    c.loss.sweep = ""

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "constant"  # constant | cosine (decay to 0 at train.steps)
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 1e-2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 switches it off

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # DisenBooth: ~1000 for animals, ~2000 for objects
    # Steps of objects (classes other than dog and cat); 0: train.steps for every subject. A
    # multi-subject job runs to its longest subject; finished subjects stop updating.
    c.train.object_steps = 0
    c.train.batch_size = 1  # global batch; must divide over the mesh's devices
    c.train.log_every = 10  # metrics.jsonl and TensorBoard
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2
    c.train.sample_every = 250  # sample grid in workdir/samples/step_N.png (and at the end)
    # Multi-host: processes agree on a SIGTERM/SIGINT every this many steps (one wait for the
    # device each time; a lone process checks every step for free).
    c.train.stop_check_every = 10
    c.train.peak_tflops_per_device = 0.0  # for MFU; 0 looks the device kind up (None if unknown)

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = (
        "a {token} {class_name} in the snow",
        "a {token} {class_name} on the beach",
        "a {token} {class_name} with a city in the background",
        "a red {token} {class_name}",
    )
    c.sample.sampler = "dpm++"  # dpm++ (DPM-Solver++ 2M) | ddim
    c.sample.num_steps = 50
    c.sample.guidance_scale = 7.5  # classifier-free guidance against FFM(E_T(""))
    c.sample.seed = 0

    # Devices = subject x data x fsdp; one size may be -1 (the remaining devices).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.subject = 1  # subjects split over this many device groups (padded to a multiple)
    c.mesh.data = -1  # each subject's batch split over data x fsdp
    c.mesh.fsdp = 1  # frozen weights sharded over this many devices
    return c
