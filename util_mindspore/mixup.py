# Derived from: timm 0.9.16 timm/data/mixup.py (Mixup, one_hot, mixup_target, rand_bbox,
# rand_bbox_minmax, cutmix_bbox_and_lam); written anew in numpy with an explicit Generator.
"""Mixup / CutMix on numpy batches, numerically equal to timm's Mixup for the same random draws."""
import numpy as np


def one_hot(x, num_classes, on_value=1.0, off_value=0.0):
    x = np.asarray(x).astype(np.int64).reshape(-1)
    out = np.full((x.shape[0], num_classes), off_value, dtype=np.float32)
    out[np.arange(x.shape[0]), x] = on_value
    return out


def mixup_target(target, num_classes, lam=1.0, smoothing=0.0):
    """Soft targets: smoothed one-hot of target and of the reversed batch, mixed by ``lam``
    (a float, or a (B, 1) float32 array for pair/elem modes)."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = one_hot(target, num_classes, on_value=on_value, off_value=off_value)
    y2 = one_hot(np.asarray(target)[::-1], num_classes, on_value=on_value, off_value=off_value)
    if np.ndim(lam) == 0:
        # torch multiplies a float32 tensor by a Python float in float32: round the scalars first.
        return y1 * np.float32(lam) + y2 * np.float32(1.0 - lam)
    lam = np.asarray(lam, dtype=np.float32)
    return y1 * lam + y2 * (np.float32(1.0) - lam)


def rand_bbox(img_shape, lam, rng, margin=0.0, count=None):
    """Square-ratio CutMix box: side ratio sqrt(1 - lam), centre uniform, clipped to the image."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
    cy = rng.integers(0 + margin_y, img_h - margin_y, size=count)
    cx = rng.integers(0 + margin_x, img_w - margin_x, size=count)
    yl = np.clip(cy - cut_h // 2, 0, img_h)
    yh = np.clip(cy + cut_h // 2, 0, img_h)
    xl = np.clip(cx - cut_w // 2, 0, img_w)
    xh = np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


def rand_bbox_minmax(img_shape, minmax, rng, count=None):
    """Box with each side uniform in [min, max) of the image side, placed uniformly inside."""
    if len(minmax) != 2:
        raise ValueError(f'cutmix_minmax needs 2 values, got {minmax!r}')
    img_h, img_w = img_shape[-2:]
    cut_h = rng.integers(int(img_h * minmax[0]), int(img_h * minmax[1]), size=count)
    cut_w = rng.integers(int(img_w * minmax[0]), int(img_w * minmax[1]), size=count)
    yl = rng.integers(0, img_h - cut_h, size=count)
    xl = rng.integers(0, img_w - cut_w, size=count)
    return yl, yl + cut_h, xl, xl + cut_w


def cutmix_bbox_and_lam(img_shape, lam, rng, ratio_minmax=None, correct_lam=True, count=None):
    if ratio_minmax is not None:
        yl, yu, xl, xu = rand_bbox_minmax(img_shape, ratio_minmax, rng, count=count)
    else:
        yl, yu, xl, xu = rand_bbox(img_shape, lam, rng, count=count)
    if correct_lam or ratio_minmax is not None:
        bbox_area = (yu - yl) * (xu - xl)
        lam = 1.0 - bbox_area / float(img_shape[-2] * img_shape[-1])
    return (yl, yu, xl, xu), lam


class Mixup:
    """timm Mixup (modes 'batch', 'pair', 'elem'); ``__call__(x, target) -> (x_mixed, soft_targets)``.

    ``x`` (B, 3, H, W) float32 is mixed in place (as timm) and returned; B must be even.
    ``rng``: np.random.Generator or an int seed."""

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode='batch', correct_lam=True, label_smoothing=0.1, num_classes=1000, rng=None):
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2:
                raise ValueError(f'cutmix_minmax needs 2 values, got {cutmix_minmax!r}')
            self.cutmix_alpha = 1.0  # as timm: minmax forces cutmix on
        if mode not in ('batch', 'pair', 'elem'):
            raise ValueError(f"--mixup_mode must be 'batch', 'pair' or 'elem', got {mode!r}")
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError('Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax')
        self.mix_prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.mode = mode
        self.correct_lam = correct_lam
        self.mixup_enabled = True
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def _params_per_elem(self, batch_size):
        r = self.rng
        lam = np.ones(batch_size, dtype=np.float32)
        use_cutmix = np.zeros(batch_size, dtype=bool)
        if self.mixup_enabled:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = r.random(batch_size) < self.switch_prob
                lam_mix = np.where(use_cutmix,
                                   r.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size),
                                   r.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size))
            elif self.mixup_alpha > 0:
                lam_mix = r.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size)
            else:
                use_cutmix = np.ones(batch_size, dtype=bool)
                lam_mix = r.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size)
            lam = np.where(r.random(batch_size) < self.mix_prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _params_per_batch(self):
        r = self.rng
        lam, use_cutmix = 1.0, False
        if self.mixup_enabled and r.random() < self.mix_prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(r.random() < self.switch_prob)
                a = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam_mix = r.beta(a, a)
            elif self.mixup_alpha > 0:
                lam_mix = r.beta(self.mixup_alpha, self.mixup_alpha)
            else:
                use_cutmix = True
                lam_mix = r.beta(self.cutmix_alpha, self.cutmix_alpha)
            lam = float(lam_mix)
        return lam, use_cutmix

    def _mix_elem(self, x):
        b = len(x)
        lam_batch, use_cutmix = self._params_per_elem(b)
        x_orig = x.copy()
        for i in range(b):
            j = b - i - 1
            lam = lam_batch[i]
            if lam != 1.0:
                if use_cutmix[i]:
                    (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                        x[i].shape, lam, self.rng, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
                    x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
                    lam_batch[i] = lam
                else:
                    x[i] = x[i] * lam + x_orig[j] * (1 - lam)
        return lam_batch[:, None].astype(np.float32)

    def _mix_pair(self, x):
        b = len(x)
        lam_batch, use_cutmix = self._params_per_elem(b // 2)
        x_orig = x.copy()
        for i in range(b // 2):
            j = b - i - 1
            lam = lam_batch[i]
            if lam != 1.0:
                if use_cutmix[i]:
                    (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                        x[i].shape, lam, self.rng, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
                    x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
                    x[j][:, yl:yh, xl:xh] = x_orig[i][:, yl:yh, xl:xh]
                    lam_batch[i] = lam
                else:
                    x[i] = x[i] * lam + x_orig[j] * (1 - lam)
                    x[j] = x[j] * lam + x_orig[i] * (1 - lam)
        lam_batch = np.concatenate((lam_batch, lam_batch[::-1]))
        return lam_batch[:, None].astype(np.float32)

    def _mix_batch(self, x):
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                x.shape, lam, self.rng, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
            x[:, :, yl:yh, xl:xh] = x[::-1][:, :, yl:yh, xl:xh].copy()
        else:
            flipped = x[::-1] * np.float32(1.0 - lam)
            x *= np.float32(lam)
            x += flipped
        return lam

    def __call__(self, x, target):
        if len(x) % 2 != 0:
            raise ValueError(f'Mixup needs an even batch size, got {len(x)}')
        if self.mode == 'elem':
            lam = self._mix_elem(x)
        elif self.mode == 'pair':
            lam = self._mix_pair(x)
        else:
            lam = self._mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)
