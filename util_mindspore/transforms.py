# Derived from: rmaphoh/RETFound util/datasets.py:build_transform, timm 0.9.16 timm/data/
# transforms_factory.py (transforms_imagenet_train), transforms.py (RandomResizedCropAndInterpolation),
# random_erasing.py (RandomErasing) and torchvision 0.x transforms (Resize, CenterCrop, ToTensor,
# Normalize, ColorJitter); written anew with numpy + PIL, no torch in the data path.
"""Train/eval image transforms: PIL image in, float32 CHW numpy array out.

Train transforms take an explicit ``np.random.Generator`` (``tf(img, rng)``) so that a sample's
augmentation is a pure function of the generator's seed (see datasets.sample_rng).
"""
import math

import numpy as np
from PIL import Image, ImageEnhance

from .auto_augment import rand_augment_transform

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- shared pieces
def _normalize_lut(mean, std):
    """(C, 256) float32 table of ``(v / 255 - mean) / std`` for every uint8 value v, computed with
    the same float32 operations as the direct formula, so a lookup gives bit-identical results."""
    key = (tuple(mean), tuple(std))
    lut = _LUTS.get(key)
    if lut is None:
        v = np.arange(256, dtype=np.uint8).astype(np.float32)[None, :] / np.float32(255.0)
        m = np.asarray(mean, dtype=np.float32).reshape(-1, 1)
        s = np.asarray(std, dtype=np.float32).reshape(-1, 1)
        lut = _LUTS[key] = np.ascontiguousarray((v - m) / s, dtype=np.float32)
    return lut


_LUTS = {}


def to_tensor_normalize(img, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """torchvision ToTensor + Normalize in float32: (uint8/255 - mean) / std, HWC -> CHW."""
    x = np.asarray(img, dtype=np.uint8)
    if x.ndim == 3 and x.shape[2] == len(mean) == len(std):
        # Table lookup per channel: same bits as the formula below, ~2x faster (one pass, no temporaries).
        lut = _normalize_lut(mean, std)
        out = np.empty((x.shape[2],) + x.shape[:2], dtype=np.float32)
        for c in range(x.shape[2]):
            np.take(lut[c], x[:, :, c], out=out[c])
        return out
    if x.ndim == 2:
        x = x[:, :, None]
    x = x.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def resize_short_side(img, size, resample=Image.BICUBIC):
    """torchvision Resize(int): short side -> size, long side -> int(size * long / short)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def center_crop(img, size):
    """torchvision CenterCrop: top/left = int(round((dim - crop) / 2)); zero-pads if too small."""
    th, tw = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if tw > w or th > h:  # pad like torchvision (fill 0), then crop
        pl, pt = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
        pr, pb = (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0
        canvas = Image.new(img.mode, (w + pl + pr, h + pt + pb), 0)
        canvas.paste(img, (pl, pt))
        img, (w, h) = canvas, canvas.size
        if (w, h) == (tw, th):
            return img
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


# ---------------------------------------------------------------- train pieces
def rrc_params(width, height, rng, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """Crop box (top, left, h, w) as timm RandomResizedCropAndInterpolation.get_params:
    10 attempts of (uniform area, log-uniform aspect), then a centred fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(img, rng, brightness, contrast, saturation):
    """torchvision ColorJitter(b, c, s) (no hue) on PIL: factors ~ U[max(0, 1-v), 1+v], random order."""
    ops = [(brightness, ImageEnhance.Brightness), (contrast, ImageEnhance.Contrast),
           (saturation, ImageEnhance.Color)]
    for k in rng.permutation(4):  # index 3 is hue: always off here (scalar --color_jitter)
        if k == 3 or not ops[k][0]:
            continue
        v, enh = ops[k]
        img = enh(img).enhance(rng.uniform(max(0.0, 1.0 - v), 1.0 + v))
    return img


def erase_boxes(chw_shape, rng, probability, max_count=1, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """Boxes (top, left, h, w) of timm RandomErasing._erase (count ~ randint[1, max_count])."""
    chan, img_h, img_w = chw_shape
    if rng.random() > probability:
        return []
    area = img_h * img_w
    count = 1 if max_count <= 1 else int(rng.integers(1, max_count + 1))
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target_area = rng.uniform(min_area, max_area) * area / count
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < img_w and h < img_h:
                top = int(rng.integers(0, img_h - h + 1))
                left = int(rng.integers(0, img_w - w + 1))
                boxes.append((top, left, h, w))
                break
    return boxes


def random_erasing(x, rng, probability, mode='pixel', max_count=1):
    """timm RandomErasing on a normalised CHW float32 array (in place, returned).

    mode 'pixel': per-pixel N(0,1); 'rand': per-channel N(0,1); 'const'/'': zeros."""
    mode = (mode or 'const').lower()
    if mode not in ('pixel', 'rand', 'const'):
        raise ValueError(f"--remode must be 'pixel', 'rand' or 'const', got {mode!r}")
    chan = x.shape[0]
    for top, left, h, w in erase_boxes(x.shape, rng, probability, max_count):
        if mode == 'pixel':
            fill = rng.standard_normal((chan, h, w), dtype=np.float32)
        elif mode == 'rand':
            fill = rng.standard_normal((chan, 1, 1), dtype=np.float32)
        else:
            fill = 0.0
        x[:, top:top + h, left:left + w] = fill
    return x


# ---------------------------------------------------------------- composed transforms
class TrainTransform:
    """timm create_transform(is_training=True) for the flags RETFound exposes:
    RandomResizedCrop(bicubic) -> hflip 0.5 -> RandAugment | ColorJitter -> ToTensor+Normalize
    -> RandomErasing."""

    def __init__(self, input_size=224, auto_augment=None, color_jitter=None, re_prob=0.0,
                 re_mode='const', re_count=1, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                 scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), hflip=0.5):
        self.size = int(input_size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode, re_count
        if re_prob > 0 and (re_mode or 'const').lower() not in ('pixel', 'rand', 'const'):
            # at build time, as timm's RandomErasing.__init__ asserts (not at the first image)
            raise ValueError(f"--remode must be 'pixel', 'rand' or 'const', got {re_mode!r}")
        aa = auto_augment
        if isinstance(aa, str) and aa.strip().lower() in ('', 'none'):
            aa = None  # the original (timm) crashes on 'none'; we treat it as "off"
        self.rand_augment = None
        if aa:
            if not aa.startswith('rand'):
                raise NotImplementedError(
                    f"--aa {aa!r}: only RandAugment ('rand-...') or 'none' is supported in this port")
            hparams = dict(translate_const=int(self.size * 0.45),
                           img_mean=tuple(min(255, round(255 * v)) for v in mean),
                           interpolation=Image.BICUBIC)
            self.rand_augment = rand_augment_transform(aa, hparams)
        # As timm: colour jitter is used only when auto-augment is off.
        self.color_jitter = None
        if color_jitter is not None and self.rand_augment is None:
            cj = color_jitter if isinstance(color_jitter, (list, tuple)) else (float(color_jitter),) * 3
            if len(cj) != 3:
                raise ValueError(f"color_jitter must be a scalar or 3 values, got {color_jitter!r}")
            self.color_jitter = tuple(float(v) for v in cj)

    def __call__(self, img, rng):
        top, left, h, w = rrc_params(img.size[0], img.size[1], rng, self.scale, self.ratio)
        img = img.crop((left, top, left + w, top + h))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        if rng.random() < self.hflip:  # torchvision RandomHorizontalFlip: flip if rand < p
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        if self.color_jitter is not None:
            img = color_jitter(img, rng, *self.color_jitter)
        x = to_tensor_normalize(img, self.mean, self.std)
        if self.re_prob > 0:
            x = random_erasing(x, rng, self.re_prob, self.re_mode, self.re_count)
        return x


class EvalTransform:
    """RETFound eval transform: Resize(int(size / crop_pct), bicubic) -> CenterCrop(size) ->
    ToTensor -> Normalize, crop_pct = 224/256 if size <= 224 else 1.0."""

    def __init__(self, input_size=224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.size = int(input_size)
        crop_pct = 224 / 256 if self.size <= 224 else 1.0
        self.resize_to = int(self.size / crop_pct)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img, rng=None):
        img = resize_short_side(img, self.resize_to, Image.BICUBIC)
        img = center_crop(img, self.size)
        return to_tensor_normalize(img, self.mean, self.std)


def build_transform(is_train, args):
    """Same switch as the original: ``is_train == 'train'`` -> train transform, else eval."""
    if is_train == 'train':
        return TrainTransform(
            input_size=args.input_size, auto_augment=getattr(args, 'aa', None),
            color_jitter=getattr(args, 'color_jitter', None), re_prob=getattr(args, 'reprob', 0.0),
            re_mode=getattr(args, 'remode', 'const'), re_count=getattr(args, 'recount', 1))
    return EvalTransform(args.input_size)
