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

_adamw = ops.MultitypeFuncGraph("retfound_adamw")


@_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor")
def _adamw_update(beta1, beta2, eps, lr, bc1, bc2_sqrt, lr_scale, weight_decay, param, grad, exp_avg, exp_avg_sq):
    """One parameter's torch AdamW update (torch/optim/adamw.py _single_tensor_adamw order)."""
    group_lr = lr * lr_scale
    param_decayed = param * (1.0 - group_lr * weight_decay)                # decoupled weight decay
    new_exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)               # exp_avg.lerp_(grad, 1 - beta1)
    new_exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
    denom = ops.sqrt(new_exp_avg_sq) / bc2_sqrt + eps
    ops.assign(exp_avg, new_exp_avg)
    ops.assign(exp_avg_sq, new_exp_avg_sq)
    ops.assign(param, param_decayed - (group_lr / bc1) * (new_exp_avg / denom))
    return True


class AdamW(nn.Cell):
    """torch.optim.AdamW over layer-decay groups from ``param_groups_lrd``.

    The base LR is an input of the compiled step (a 0-d tensor), so the schedule changes it
    every step without recompiling; each group's LR is ``lr * lr_scale``. State parameters are
    named ``exp_avg.<param>`` / ``exp_avg_sq.<param>`` / ``optimizer.step`` so they can be saved
    beside the model in one checkpoint without name clashes.
    """

    def __init__(self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(auto_prefix=False)
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
        self.scale_values = tuple(scales)
        self.beta1 = Tensor(betas[0], ms.float32)
        self.beta2 = Tensor(betas[1], ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.betas = betas
        self.current_lr = float(lr)
        self.hyper_map = ops.HyperMap()

    def set_lr(self, lr):
        """Record the base LR for the next step (passed to the compiled step as a tensor)."""
        self.current_lr = float(lr)

    def group_lrs(self):
        """Effective LR of every parameter at ``current_lr`` (for logging and tests)."""
        return [self.current_lr * s for s in self.scale_values]

    def state_parameters(self):
        return list(self.exp_avg) + list(self.exp_avg_sq) + [self.step_count]

    def construct(self, grads, lr):
        step = self.step_count + 1.0
        ops.assign(self.step_count, step)
        bc1 = 1.0 - ops.pow(self.beta1, step)
        bc2_sqrt = ops.sqrt(1.0 - ops.pow(self.beta2, step))
        apply = ops.partial(_adamw, self.beta1, self.beta2, self.eps, lr, bc1, bc2_sqrt)
        return self.hyper_map(apply, self.lr_scales, self.weight_decays, self.parameters, grads,
                              self.exp_avg, self.exp_avg_sq)


def clip_grad_norm(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_(norm_type=2): scale by min(1, max_norm / (total + 1e-6))."""
    sq = [ops.reduce_sum(ops.square(g)) for g in grads]
    total = ops.sqrt(ops.addn(sq))
    coef = ops.clamp(max_norm / (total + 1e-6), max=1.0)
    return tuple(g * coef for g in grads), total
