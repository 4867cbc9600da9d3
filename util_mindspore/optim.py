# --------------------------------------------------------
# AdamW with torch.optim.AdamW semantics, and global-norm gradient clipping.
# Derived from: torch.optim.AdamW (single-tensor path: decoupled decay, bias correction,
# eps added after the bias-corrected sqrt) and torch.nn.utils.clip_grad_norm_.
# Written anew for MindSpore.
#
# Why not nn.AdamWeightDecay: it has no bias correction and eps=1e-6; after 3 steps its update
# is ~5x off torch's (STYLE.md). mint.optim.AdamW is Ascend-only.
# --------------------------------------------------------
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor

from util_mindspore import cpu_kernels

_adamw = ops.MultitypeFuncGraph("retfound_adamw")


def _adamw_candidates(beta1, beta2, eps, lr, bc1, bc2_sqrt, lr_scale, weight_decay, param, grad, exp_avg, exp_avg_sq):
    """One parameter's torch AdamW step (torch/optim/adamw.py _single_tensor_adamw order):
    the new (param, exp_avg, exp_avg_sq), not yet assigned."""
    group_lr = lr * lr_scale
    param_decayed = param * (1.0 - group_lr * weight_decay)                # decoupled weight decay
    new_exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)               # exp_avg.lerp_(grad, 1 - beta1)
    new_exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
    denom = ops.sqrt(new_exp_avg_sq) / bc2_sqrt + eps
    return param_decayed - (group_lr / bc1) * (new_exp_avg / denom), new_exp_avg, new_exp_avg_sq


@_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor")
def _adamw_update(beta1, beta2, eps, lr, bc1, bc2_sqrt, lr_scale, weight_decay, param, grad, exp_avg, exp_avg_sq):
    """The reference (composed) update, used with fused=False."""
    new_param, new_exp_avg, new_exp_avg_sq = _adamw_candidates(beta1, beta2, eps, lr, bc1, bc2_sqrt, lr_scale,
                                                               weight_decay, param, grad, exp_avg, exp_avg_sq)
    ops.assign(exp_avg, new_exp_avg)
    ops.assign(exp_avg_sq, new_exp_avg_sq)
    ops.assign(param, new_param)
    return True


_adamw_kernel = ops.MultitypeFuncGraph("retfound_adamw_kernel")


@_adamw_kernel.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_kernel_update(kernel, step_h, group_h, param, grad, exp_avg, exp_avg_sq):
    """torch's AdamW step through the library's in-place kernel (cpu_kernels.adamw_op), the same
    arithmetic as the composed update (``step_h`` must wait for all of the step's gradients: see
    AdamW.construct)."""
    return kernel(param, exp_avg, exp_avg_sq, grad, step_h, group_h)


_adamw_fused = ops.MultitypeFuncGraph("retfound_adamw_fused")


@_adamw_fused.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_fused_update(kernel, beta1, beta2, eps, lr, bc1, bc2_sqrt, lr_scale, weight_decay, param, grad, exp_avg,
                        exp_avg_sq):
    """torch's AdamW step through MindSpore's in-place AdamWeightDecay kernel.

    The kernel computes m, v without bias correction and param -= lr_k * (m / (sqrt(v) + eps_k)
    + decay_k * param). torch's step, param*(1 - lr*wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
    is exactly that with lr_k = lr*sqrt(bc2)/bc1, eps_k = eps*sqrt(bc2), decay_k = wd*bc1/sqrt(bc2).
    One in-place kernel instead of ~10 elementwise ops: GRAPH mode on CPU keeps every temporary
    of the step alive until the graph ends (docs/performance.md), so this saves ~2 GB on ViT-B.
    """
    group_lr = lr * lr_scale
    lr_k = group_lr * bc2_sqrt / bc1
    eps_k = eps * bc2_sqrt
    decay_k = weight_decay * bc1 / bc2_sqrt
    return kernel(param, exp_avg, exp_avg_sq, lr_k, beta1, beta2, eps_k, decay_k, grad)


@_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_update_if(keep, beta1, beta2, eps, lr, bc1, bc2_sqrt, lr_scale, weight_decay, param, grad, exp_avg,
                     exp_avg_sq):
    """The same update, applied only where ``keep`` (loss scaling: skip the step on overflow, as
    torch's GradScaler does); with non-finite grads the discarded candidates are inf/nan."""
    new_param, new_exp_avg, new_exp_avg_sq = _adamw_candidates(beta1, beta2, eps, lr, bc1, bc2_sqrt, lr_scale,
                                                               weight_decay, param, grad, exp_avg, exp_avg_sq)
    ops.assign(exp_avg, ops.where(keep, new_exp_avg, exp_avg))
    ops.assign(exp_avg_sq, ops.where(keep, new_exp_avg_sq, exp_avg_sq))
    ops.assign(param, ops.where(keep, new_param, param))
    return True


class AdamW(nn.Cell):
    """torch.optim.AdamW over layer-decay groups from ``param_groups_lrd``.

    The base LR is an input of the compiled step (a 0-d tensor), so the schedule changes it
    every step without recompiling; each group's LR is ``lr * lr_scale``. State parameters are
    named ``exp_avg.<param>`` / ``exp_avg_sq.<param>`` / ``optimizer.step`` so they can be saved
    beside the model in one checkpoint without name clashes.
    """

    def __init__(self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=True):
        super().__init__(auto_prefix=False)
        # fused=True: the library's threaded in-place step on CPU (cpu_kernels.adamw_op; fp32
        # parameters, kernels built), else MindSpore's in-place AdamWeightDecay kernel;
        # 'ms': always AdamWeightDecay; False: the same update as ~10 element-wise ops (reference).
        if fused not in (True, False, 'ms'):
            raise ValueError(f"fused must be True, False or 'ms', got {fused!r}")
        self.fused = bool(fused)
        self.kernel = ops.AdamWeightDecay(use_locking=False)
        self.inplace = None
        params, scales, decays = [], [], []
        for g in param_groups:
            for p in g["params"]:
                params.append(p)
                scales.append(float(g.get("lr_scale", 1.0)))
                decays.append(float(g.get("weight_decay", 0.0)))
        if not params:
            raise ValueError("the optimizer got no trainable parameters")
        self.parameters = ParameterTuple(params)
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.step_count = Parameter(Tensor(0.0, ms.float32), name="optimizer.step", requires_grad=False)
        self.lr_scales = tuple(Tensor(s, ms.float32) for s in scales)
        self.weight_decays = tuple(Tensor(d, ms.float32) for d in decays)
        if fused is True and cpu_kernels.enabled() and all(p.dtype == ms.float32 for p in params):
            self.inplace = cpu_kernels.adamw_op()
            self.group_hs = tuple(Tensor([s, d], ms.float32) for s, d in zip(scales, decays))
        self.scale_values = tuple(scales)
        self.beta1 = Tensor(betas[0], ms.float32)
        self.beta2 = Tensor(betas[1], ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.current_lr = float(lr)
        self.hyper_map = ops.HyperMap()

    def set_lr(self, lr):
        """Record the base LR for the next step (passed to the compiled step as a tensor)."""
        self.current_lr = float(lr)

    def group_lrs(self):
        """Effective LR of every parameter at ``current_lr`` (for logging and tests)."""
        return [self.current_lr * s for s in self.scale_values]

    def _bias_corrections(self, increment):
        step = self.step_count + increment
        ops.assign(self.step_count, step)
        step = ops.maximum(step, 1.0)  # a skipped first step must not divide by zero
        return 1.0 - ops.pow(self.beta1, step), ops.sqrt(1.0 - ops.pow(self.beta2, step))

    def construct(self, grads, lr):
        bc1, bc2_sqrt = self._bias_corrections(1.0)
        if self.inplace is not None:
            # MindSpore does not see that the kernel writes the parameters: it would be free to run
            # an update while another operator still reads that parameter (a backward GEMM). So
            # every update takes step_h, which waits for all of the step's gradients, and every
            # reader of a parameter feeds one of them. (An ops.depend on the parameter input
            # itself is not kept by GRAPH mode: tested.)
            step_h = ops.depend(ops.stack([ops.cast(lr, ms.float32), self.beta1, self.beta2, self.eps, bc1, bc2_sqrt]),
                                grads)
            apply = ops.partial(_adamw_kernel, self.inplace, step_h)
            return self.hyper_map(apply, self.group_hs, self.parameters, grads, self.exp_avg, self.exp_avg_sq)
        if self.fused:
            apply = ops.partial(_adamw_fused, self.kernel, self.beta1, self.beta2, self.eps, lr, bc1, bc2_sqrt)
        else:
            apply = ops.partial(_adamw, self.beta1, self.beta2, self.eps, lr, bc1, bc2_sqrt)
        return self.hyper_map(apply, self.lr_scales, self.weight_decays, self.parameters, grads,
                              self.exp_avg, self.exp_avg_sq)

    def apply_if(self, grads, lr, keep):
        """One step that is skipped entirely (moments, step count, parameters) when ``keep`` is False."""
        bc1, bc2_sqrt = self._bias_corrections(ops.cast(keep, ms.float32))
        apply = ops.partial(_adamw, keep, self.beta1, self.beta2, self.eps, lr, bc1, bc2_sqrt)
        return self.hyper_map(apply, self.lr_scales, self.weight_decays, self.parameters, grads,
                              self.exp_avg, self.exp_avg_sq)


class LossScaler(nn.Cell):
    """Dynamic loss scale with torch.cuda.amp.GradScaler's defaults and rules: start at 2**16,
    multiply by 2 after 2000 consecutive finite steps, by 0.5 on overflow (and skip that step).

    Used with --amp_level O1/O2/O3 (float16). Its state is saved in checkpoint-latest."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        super().__init__(auto_prefix=False)
        self.scale = Parameter(Tensor(init_scale, ms.float32), name="scaler.scale", requires_grad=False)
        self.growth_tracker = Parameter(Tensor(0.0, ms.float32), name="scaler.growth_tracker", requires_grad=False)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = float(growth_interval)

    def construct(self, finite):
        """Update the scale after a step whose gradients were (not) all finite."""
        tracker = ops.where(finite, self.growth_tracker + 1.0, ops.zeros_like(self.growth_tracker))
        grow = tracker >= self.growth_interval
        new_scale = ops.where(finite, ops.where(grow, self.scale * self.growth_factor, self.scale),
                              self.scale * self.backoff_factor)
        ops.assign(self.growth_tracker, ops.where(grow, ops.zeros_like(tracker), tracker))
        ops.assign(self.scale, new_scale)
        return finite

    def state_dict(self):
        return {"scale": float(self.scale.asnumpy()), "growth_tracker": float(self.growth_tracker.asnumpy())}

    def load_state_dict(self, state):
        self.scale.set_data(Tensor(float(state["scale"]), ms.float32))
        self.growth_tracker.set_data(Tensor(float(state["growth_tracker"]), ms.float32))


def all_finite(grads):
    """True when every gradient element is finite (a 0-d bool tensor)."""
    return ops.stack([ops.isfinite(g).all() for g in grads]).all()


def clip_grad_norm(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_(norm_type=2): scale by min(1, max_norm / (total + 1e-6))."""
    sq = [ops.reduce_sum(ops.square(g)) for g in grads]
    total = ops.sqrt(ops.addn(sq))
    coef = ops.clamp(max_norm / (total + 1e-6), max=1.0)
    return tuple(g * coef for g in grads), total
