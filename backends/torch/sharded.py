"""AdamW over several processes with its state sharded by FSDP2 (`--shard`).

`torch.distributed.fsdp.fully_shard` takes the adapter's master weights: each process holds
1/N of every adapter array (a DTensor sharded along dim 0, FSDP2's layout) and AdamW's
moments for that 1/N only. A step takes the gradients already summed over the processes
(the trainer's all-reduce), updates this process's shard, and FSDP2's `unshard` all-gathers
the new weights into the whole adapter the forward reads (lorafit's decoder is a function
over a dict of arrays, not an `nn.Module` FSDP2 could hook, so the frozen base stays
replicated). Checkpoints hold whole arrays: the state round-trips through numpy as
`TorchAdamW`'s does, so a sharded run resumes in any number of processes and vice versa.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class ShardedAdamW:
    def __init__(self, params: dict, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        from torch.distributed.fsdp import fully_shard

        self.names, self.params = list(params), params
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.shards = self.world
        holder = torch.nn.Module()
        holder.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(params[n].detach().clone()) for n in self.names])
        fully_shard(holder)
        self._holder = holder
        self.pieces = list(holder.parameters())  # DTensors, Shard(0) over the world
        on_cuda = self.pieces[0].device.type == "cuda"
        self.opt = torch.optim.AdamW(self.pieces, lr=0.0, betas=betas, eps=eps,
                                     weight_decay=weight_decay, foreach=not on_cuda)
        self.step_count = 0

    def _local(self, full: torch.Tensor, shard: DTensor) -> torch.Tensor:
        """This process's rows of a whole array, as FSDP2 (torch.chunk along dim 0) cuts."""
        n = shard.to_local().shape[0]
        per = -(-full.shape[0] // self.world)
        start = min(self.rank * per, full.shape[0])
        return full[start:start + n]

    def _dtensor(self, full, shard: DTensor) -> DTensor:
        local = self._local(full, shard).to(shard.device, shard.dtype).contiguous()
        return DTensor.from_local(local, shard.device_mesh, shard.placements, run_check=False,
                                  shape=shard.shape, stride=shard.stride())

    @torch.no_grad()
    def step(self, params, grads, lr, grad_scale=1.0):
        for name, shard in zip(self.names, self.pieces):
            g = grads[name]
            shard.grad = self._dtensor(g * grad_scale if grad_scale != 1.0 else g, shard)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for shard in self.pieces:
            shard.grad = None
        self._holder.unshard()  # FSDP2's all-gather: the whole updated adapter
        for name, whole in zip(self.names, self._holder.parameters()):
            self.params[name].copy_(whole)
        self._holder.reshard()
        self.step_count += 1

    def state_to_numpy(self) -> dict:
        """Whole moments (an all-gather: every process must call it at the same point)."""
        out = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for name, shard in zip(self.names, self.pieces):
            st = self.opt.state.get(shard)
            if not st:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}.{name}"] = st[key].full_tensor().detach().cpu().numpy()
        return out

    def load_state_numpy(self, state: dict) -> None:
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])
        sd = self.opt.state_dict()
        restored = {}
        for i, (name, shard) in enumerate(zip(self.names, self.pieces)):
            if f"exp_avg.{name}" not in state:
                continue
            restored[i] = {"step": torch.tensor(float(self.step_count), dtype=torch.float32)}
            for key in ("exp_avg", "exp_avg_sq"):
                restored[i][key] = self._dtensor(
                    torch.from_numpy(np.array(state[f"{key}.{name}"])), shard)
        self.opt.load_state_dict({"state": restored, "param_groups": sd["param_groups"]})
