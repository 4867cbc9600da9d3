# Derived from: timm 0.9.16 timm/data/auto_augment.py (RandAugment policy: op lists, level->argument
# mappings, magnitude noise, per-op probability); written anew with PIL + numpy, no torch.
"""timm-style RandAugment on PIL images with an explicit ``np.random.Generator``.

Only the ``rand-...`` policies are supported (the original RETFound exposes ``--aa`` with default
``rand-m9-mstd0.5-inc1``). Every random draw comes from the generator passed to ``__call__``, never
from the global ``random``/``numpy`` state, so a sample's augmentation depends only on its seed.
"""
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_LEVEL_DENOM = 10.0  # 'mX' magnitudes are on a 0..10 scale
_FILL = (128, 128, 128)

# Op names in timm's order: the order matters because ops are chosen by index.
RAND_TRANSFORMS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]
RAND_INCREASING_TRANSFORMS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]


# ---------------------------------------------------------------- image ops (PIL in, PIL out)
def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def shear_x(img, factor, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_rel(img, pct, fill, resample):
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def translate_y_rel(img, pct, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def rotate(img, degrees, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def auto_contrast(img, **_):
    return ImageOps.autocontrast(img)


def equalize(img, **_):
    return ImageOps.equalize(img)


def invert(img, **_):
    return ImageOps.invert(img)


def solarize(img, thresh, **_):
    # Pixels >= thresh are inverted (thresh 256: identity), as PIL's ImageOps.solarize.
    lut = [i if i < thresh else 255 - i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def solarize_add(img, add, thresh=128, **_):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def posterize(img, bits, **_):
    """Keep the top ``bits`` bits of every channel; bits <= 0 gives a black image.

    PARITY: bits=0 -> all-black image, as ImageOps.posterize under the original's pinned Pillow 10.2
    (timm auto_augment.py:posterize with PosterizeIncreasing at magnitude 10); Pillow >= 11 rejects 0.
    """
    if bits >= 8:
        return img
    mask = (~(2 ** (8 - max(0, bits)) - 1)) & 0xFF
    lut = [i & mask for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(cls):
    def op(img, factor, **_):
        return cls(img).enhance(factor)
    return op


NAME_TO_OP = {
    'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': invert, 'Rotate': rotate,
    'Posterize': posterize, 'PosterizeIncreasing': posterize,
    'Solarize': solarize, 'SolarizeIncreasing': solarize, 'SolarizeAdd': solarize_add,
    'Color': _enhance(ImageEnhance.Color), 'ColorIncreasing': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast), 'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': shear_x, 'ShearY': shear_y, 'TranslateXRel': translate_x_rel, 'TranslateYRel': translate_y_rel,
}
_GEOMETRIC = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'}


# ---------------------------------------------------------------- magnitude -> op argument
def _negate(v, rng):
    # timm: "-v if random.random() > 0.5 else v"
    return -v if rng.random() > 0.5 else v


def level_to_arg(name, level, rng, hparams):
    """Map a (noisy, clipped) magnitude in [0, 10] to the op's argument, as timm's LEVEL_TO_ARG.

    ``rng`` supplies the random sign for signed ops; it is not touched for the others.
    """
    frac = level / _LEVEL_DENOM
    if name in ('AutoContrast', 'Equalize', 'Invert'):
        return None
    if name == 'Rotate':
        return _negate(frac * 30.0, rng)
    if name in ('ShearX', 'ShearY'):
        return _negate(frac * 0.3, rng)
    if name in ('TranslateXRel', 'TranslateYRel'):
        return _negate(frac * hparams.get('translate_pct', 0.45), rng)
    if name == 'Posterize':
        return int(frac * 4)
    if name == 'PosterizeIncreasing':
        return 4 - int(frac * 4)
    if name == 'Solarize':
        return min(256, int(frac * 256))
    if name == 'SolarizeIncreasing':
        return 256 - min(256, int(frac * 256))
    if name == 'SolarizeAdd':
        return min(128, int(frac * 110))
    if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        return frac * 1.8 + 0.1
    if name.endswith('Increasing'):  # Color/Contrast/Brightness/SharpnessIncreasing
        return max(0.1, 1.0 + _negate(frac * 0.9, rng))
    raise KeyError(name)


def apply_op(img, name, level, rng, hparams):
    """Apply op ``name`` at magnitude ``level`` (already noisy and clipped)."""
    arg = level_to_arg(name, level, rng, hparams)
    fn = NAME_TO_OP[name]
    if name in _GEOMETRIC:
        return fn(img, arg, fill=hparams.get('img_mean', _FILL),
                  resample=hparams.get('interpolation', Image.BICUBIC))
    return fn(img) if arg is None else fn(img, arg)


# ---------------------------------------------------------------- the policy
class RandAugment:
    """``num_layers`` ops drawn uniformly with replacement; each applied with ``prob``.

    Draw order per op (as timm's AugmentOp.__call__): apply? -> magnitude noise -> sign.
    """

    def __init__(self, names, magnitude=10, num_layers=2, prob=0.5, magnitude_std=0.0,
                 magnitude_max=None, hparams=None):
        self.names = list(names)
        self.magnitude = magnitude
        self.num_layers = num_layers
        self.prob = prob
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.hparams = dict(hparams or {})

    def sample_magnitude(self, rng):
        m = self.magnitude
        if self.magnitude_std == float('inf'):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        upper = self.magnitude_max or _LEVEL_DENOM
        return max(0.0, min(m, upper))

    def __call__(self, img, rng):
        for k in rng.integers(0, len(self.names), size=self.num_layers):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            img = apply_op(img, self.names[k], self.sample_magnitude(rng), rng, self.hparams)
        return img

    def __repr__(self):
        return (f'RandAugment(n={self.num_layers}, m={self.magnitude}, mstd={self.magnitude_std}, '
                f'p={self.prob}, ops={self.names})')


def rand_augment_transform(config_str, hparams=None):
    """Parse a timm RandAugment string such as ``rand-m9-mstd0.5-inc1``.

    Sections: m (magnitude), n (layers), p (per-op prob), mstd (magnitude noise std; >100 = uniform),
    mmax (magnitude upper bound), inc (increasing op set). Weighted/'t' op sets are not supported.
    """
    hparams = dict(hparams or {})
    magnitude, num_layers, prob, increasing = _LEVEL_DENOM, 2, 0.5, False
    mstd, mmax = hparams.pop('magnitude_std', 0.0), hparams.pop('magnitude_max', None)
    parts = config_str.split('-')
    if parts[0] != 'rand':
        raise ValueError(f"not a RandAugment config: {config_str!r} (expected 'rand-...')")
    for c in parts[1:]:
        if c.startswith('t'):
            raise NotImplementedError(f"RandAugment op-set section {c!r} in {config_str!r} is not supported")
        cs = re.split(r'(\d.*)', c)
        if len(cs) < 2:
            continue
        key, val = cs[:2]
        if key == 'mstd':
            mstd = float(val)
            if mstd > 100:
                mstd = float('inf')
        elif key == 'mmax':
            mmax = int(val)
        elif key == 'inc':
            # PARITY: any 'incX' (even 'inc0') selects the increasing set: timm tests bool('0') == True
            # (timm auto_augment.py:rand_augment_transform).
            increasing = bool(val)
        elif key == 'm':
            magnitude = int(val)
        elif key == 'n':
            num_layers = int(val)
        elif key == 'p':
            prob = float(val)
        else:
            raise ValueError(f"unknown RandAugment config section {c!r} in {config_str!r}")
    names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    return RandAugment(names, magnitude=magnitude, num_layers=num_layers, prob=prob,
                       magnitude_std=mstd, magnitude_max=mmax, hparams=hparams)

