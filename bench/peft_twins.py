"""PEFT twins of our adapters for the benchmarks: many adapters in one PeftModel, ours copied into them, and the
per-task training loop (set_adapter, a forward/backward per task) that PEFT users write for a mixed batch."""
from __future__ import annotations

import torch


def peft_multi(lm, cfg, n: int):
    """A PeftModel over ``lm`` with adapters t0 .. t{n-1} of one LoraConfig."""
    from peft import get_peft_model

    pm = get_peft_model(lm, cfg, adapter_name="t0")
    for i in range(1, n):
        pm.add_adapter(f"t{i}", cfg)
    return pm


def copy_group_into(pm, group, n: int) -> None:
    """Give PEFT adapter t_i the LoRA factors of task slot i of one of our adapter groups."""
    with torch.no_grad():
        for name, module in pm.named_modules():
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and module.lora_A:
                p = group.params(name.removeprefix("base_model.model."))
                for i in range(n):
                    module.lora_A[f"t{i}"].weight.copy_(p["A"][i])
                    module.lora_B[f"t{i}"].weight.copy_(p["B"][i])


def per_task_loop(multi, batch: dict, tasks: int, loss, lr: float):
    """One optimiser step over a mixed batch the PEFT way: for each task, set_adapter and forward/backward its
    rows; ``loss(model, rows)`` gives the loss of a sub-batch."""
    opt = torch.optim.Adam([p for n, p in multi.named_parameters() if "lora_" in n], lr=lr)
    rows = {t: (batch["task_ids"] == t).nonzero().flatten() for t in range(tasks)}

    def step():
        opt.zero_grad()
        for t, idx in rows.items():
            if len(idx):
                multi.set_adapter(f"t{t}")
                loss(multi, {k: v[idx] for k, v in batch.items()}).backward()
        opt.step()

    return step
