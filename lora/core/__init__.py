"""The core: the LoRA layer and the op it runs, on any device.

    config.py     LoRAConfig (PEFT's fields), the scaling and the init modes
    layer.py      LoRALinear: a frozen nn.Linear plus lora_A, lora_B; merge / unmerge / disable
    op.py         the plain PyTorch op: one autograd Function for one projection or a group of them
    dora.py       DoRA: the factored row norm ‖W + s·B A‖ and the plain DoRA op (PEFT's forward)
    dropout.py    dropout by the indices of the dropped elements, regenerated from a seed
    group.py      q/k/v and gate/up found to read one input, so they share one shrink
    recompute.py  a LoRA input rebuilt in backward from tensors autograd keeps anyway
    thin.py       the adapter's thin products on the CPU: oneDNN's fp32 matmul where present
    backend.py    which op a forward runs: the plain op, the Triton kernels (lora.kernels), graph-safe
    delta.py      the merged weight W + Σ w·s·B A, rounded once
    inject.py     find the target projections of a model and swap in LoRALinear
"""
