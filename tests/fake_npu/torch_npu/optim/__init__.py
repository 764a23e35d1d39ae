"""torch_npu.optim of the fake: NpuFusedAdam with the rules of the real one (torch_npu/optim/npu_fused_adam.py,
npu_fused_optim_base.py at 9e73e70), computed by torch's single-tensor Adam."""

import torch

from torch_npu import _record


class NpuFusedAdam(torch.optim.Adam):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False):
        params = list(params)
        for p in params:
            if p.dtype not in (torch.float32, torch.float16):  # npu_fused_optim_base.py:53-68
                raise TypeError("Fused optimizer's parameters must be either float32 or float16")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=False)
        self.is_fused_optimizer = True  # npu_fused_optim_base.py:25
        _record.event("optimizer", name="NpuFusedAdam")

    def zero_grad(self, set_to_none=False):
        if set_to_none:  # npu_fused_optim_base.py:127-131
            raise ValueError("set_to_none is not supported in fused optimizers")
        super().zero_grad(set_to_none=False)
