"""The multi-adapter kernels (kernels/segmented.py) against float64 and the plain grouped path
(lora/serving/grouped.py), under Triton's interpreter on CPU (compiled on a GPU when there is one).
Shapes are not multiples of the tiles; ranks differ (zero-padded to the largest); rows with no
adapter must keep y bit for bit; the S buffer starts as NaN (poisoned), so any row the expand reads
that the shrink did not write shows."""

import pytest
import torch

from triton_interpreter import DEVICE, poisoned_outputs  # noqa: E402,F401  (first: the interpreter)
from lora.kernels.segmented import bgmv_, segments, sgmv_  # noqa: E402
from lora.serving.grouped import grouped_lora_  # noqa: E402

RANKS = [5, 3, 8]


def stacks(K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, R = len(RANKS), max(RANKS)
    A, Bt = torch.zeros(n, R, K), torch.zeros(n, R, N)
    for k, r in enumerate(RANKS):
        A[k, :r] = torch.randn(r, K, generator=g) / K ** 0.5
        Bt[k, :r] = torch.randn(r, N, generator=g)
    return A, Bt, torch.tensor([0.5, 2.0, 1.25])


def reference(y, x, A, Bt, s, rows):
    """float64: y[i] + s_k (x[i] A_kᵀ) B_k, row by row."""
    out = y.double().clone()
    for i, k in enumerate(rows):
        if k >= 0:
            out[i] += s[k].double() * (x[i].double() @ A[k].double().T) @ Bt[k].double()
    return out


def plain(y, x, A, Bt, s, rows):
    ids = torch.tensor(rows)
    views = [(A[k, :r], Bt[k, :r], float(s[k])) for k, r in enumerate(RANKS)]
    groups = [(k, torch.nonzero(ids == k).squeeze(1)) for k in sorted(set(rows) - {-1})]
    out = y.clone()
    grouped_lora_(out, x, views, groups)
    return out


@pytest.mark.parametrize("K, N, rows", [
    (45, 29, [0, -1, 2, 1, 2, -1, 0]),                       # decode: one token per row, mixed
    (70, 37, [2] * 5 + [-1] * 3 + [0] * 9 + [1] * 2 + [2] * 4),   # prefill: runs of rows (T tokens each)
])
@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
def test_kernels_match_float64_and_the_plain_path(K, N, rows, kernel):
    g = torch.Generator().manual_seed(1)
    A, Bt, s = stacks(K, N)
    M = len(rows)
    x, y = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    ids = torch.tensor(rows, dtype=torch.int32)
    got = y.clone().to(DEVICE)
    args = (got, x.to(DEVICE), A.to(DEVICE), Bt.to(DEVICE), s.to(DEVICE))
    if kernel == "bgmv":
        bgmv_(*args, ids.to(DEVICE))
    else:
        start, length, adapter = segments(ids)
        sgmv_(*args, start.to(DEVICE), length.to(DEVICE), adapter.to(DEVICE), int(length.max()))
    got = got.cpu()
    ref = reference(y, x, A, Bt, s, rows)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (got - plain(y, x, A, Bt, s, rows)).abs().max() <= 1e-5 * ref.abs().max()
    none = [i for i, k in enumerate(rows) if k < 0]
    assert torch.equal(got[none], y[none])                     # no adapter: the base output, bit for bit


def test_segments_are_runs_without_the_base_rows():
    start, length, adapter = segments(torch.tensor([1, 1, -1, -1, 0, 2, 2, 2, 1]))
    assert start.tolist() == [0, 4, 5, 8] and length.tolist() == [2, 1, 3, 1] and adapter.tolist() == [1, 0, 2, 1]


def test_mixed_batch_model_on_the_kernels_matches_the_plain_path(tmp_path):
    """A model holding three adapters (different ranks and targets, one of them DoRA): prefill (per
    segment) and decode (per row) on the kernels give the plain path's tokens and logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora import LoRAConfig, apply_lora, save_adapter, set_backend, get_backend
    from lora.inference.generate import generate, left_pad, position_ids_from_mask
    from lora.serving import adapter_rows, load_adapters

    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    state = LlamaForCausalLM(cfg).state_dict()
    for name, c in {"a": LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False),
                    "b": LoRAConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
                    "c": LoRAConfig(r=3, lora_alpha=6, target_modules=["v_proj", "up_proj"], use_dora=True,
                                    init_lora_weights=False)}.items():
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(state)
        apply_lora(m, c)
        with torch.no_grad():                               # DoRA's magnitudes off the norm: g ≠ 1
            for n, p in m.named_parameters():
                if n.endswith("lora_magnitude_vector"):
                    p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
        save_adapter(m, tmp_path / name)
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(state)
    model = load_adapters(model, {n: tmp_path / n for n in "abc"}).eval()
    rows = ["b", None, "a", "c", "a", "b", "c"]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [17, 18], [14], [15, 16], [19, 20, 21]]
    ids, mask = left_pad(prompts, 0)
    old = get_backend()
    results = {}
    try:
        for backend_name in ("torch", "triton"):
            set_backend(backend_name)
            with torch.no_grad(), adapter_rows(model, rows):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            results[backend_name] = (logits, generate(model, prompts, 3, eos_token_id=(), adapters=rows).tokens)
    finally:
        set_backend(old)
    assert (results["triton"][0] - results["torch"][0]).abs().max() <= 1e-4
    assert results["triton"][1] == results["torch"][1]
