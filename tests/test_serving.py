"""Many adapters in one batch (lora/serving/) and the no-gradient LoRA forward (lora/core/infer_op.py):
every row of a mixed batch against its adapter alone and a float64 reference, base rows bit for bit,
left padding and EOS per row, the static-shape (masked) path, bad input as one line."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import LlamaForCausalLM

from lora import LoRAConfig, LoRAError, LoRALinear, apply_lora, load_adapter, save_adapter
from lora.core import backend, infer_op
from lora.core.op import lora_linear_torch
from lora.inference.generate import generate, left_pad, position_ids_from_mask
from lora.demo.tokenizer import save_char_tokenizer
from lora.inference.complete import complete
from lora.inference.load import load_for_generation
from lora.serving import MultiLoRALinear, adapter_names, adapter_rows, load_adapters
from lora.serving import layer as serving_layer, rows as serving_rows
from lora.serving.grouped import batched_lora_
from lora.serving.rows import RowIndex, ServingState
from lora.quant.nf4 import NF4Weight
from lora.storage.model_dir import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import infer  # noqa: E402

from test_infer import tiny_config  # noqa: E402  (the same tiny Llama as the inference tests)


# Adapters that differ in rank, alpha, targets, rank/alpha patterns, rsLoRA and layers.
ADAPTERS = {
    "all7": LoRAConfig(r=8, lora_alpha=16, init_lora_weights=False),
    "qvd": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                      rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3.0}, init_lora_weights=False),
    "late": LoRAConfig(r=3, lora_alpha=5, target_modules=["o_proj", "up_proj", "k_proj"],
                       layers_to_transform=[1], init_lora_weights=False),
}


DORA = LoRAConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                  init_lora_weights=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny Llama's state and three adapters for it (random A and B), saved in PEFT's format."""
    root = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    state = copy.deepcopy(base.state_dict())
    base.save_pretrained(root / "base")
    save_char_tokenizer(root / "base")
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        m = LlamaForCausalLM(tiny_config())
        m.load_state_dict(state)
        apply_lora(m, cfg)
        with torch.no_grad():                        # B scaled down: logits stay sharp, still far from the base
            for n, p in m.named_parameters():
                if n.endswith("lora_B"):
                    p.mul_(0.3)
        save_adapter(m, root / name)
    torch.manual_seed(20)                            # a DoRA adapter, its magnitudes moved off ‖W + s·B A‖
    m = LlamaForCausalLM(tiny_config())
    m.load_state_dict(state)
    apply_lora(m, DORA)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.mul_(0.3)
            if n.endswith("lora_magnitude_vector"):
                p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
    save_adapter(m, root / "dora")
    other = LlamaForCausalLM(tiny_config(hidden_size=60))
    save_adapter(apply_lora(other, LoRAConfig(r=2, target_modules=["q_proj"])), root / "other_base")
    return root, state


def fresh(state, dtype=torch.float32):
    m = LlamaForCausalLM(tiny_config())
    m.load_state_dict(state)
    return m.to(dtype).eval()


def alone(saved, name, dtype=torch.float32):
    root, state = saved
    m = fresh(state, dtype) if name is None else load_adapter(fresh(state), root / name).to(dtype)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def mixed(saved):
    root, state = saved
    return load_adapters(fresh(state), {n: root / n for n in ADAPTERS})


ROWS = ["all7", None, "qvd", "late", "all7", None, "qvd"]


def forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def batch(n=len(ROWS), seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    prompts = [torch.randint(3, 101, (k,), generator=g).tolist() for k in lengths]
    return prompts, *left_pad(prompts, 0)


@pytest.mark.parametrize("form", ["grouped", "batched", "masked"])
def test_every_row_is_its_adapter_alone(saved, form, monkeypatch):
    """Each row's logits equal its adapter's model (fp32, same batch) and a float64 run of it; base rows
    are the base's bit for bit, on the grouped, the batched and the masked (static-shape) path."""
    graph_safe = form == "masked"
    prompts, ids, mask = batch()
    model = mixed(saved)
    calls = []
    monkeypatch.setattr(serving_layer, "batched_lora_", lambda *a: calls.append(1) or batched_lora_(*a))
    if form == "grouped":
        monkeypatch.setattr(serving_rows, "MAX_PADDING", 0.0)
    backend.set_graph_safe(graph_safe)
    try:
        with adapter_rows(model, ROWS):
            got = forward(model, ids, mask)
    finally:
        backend.set_graph_safe(False)
    # Modules holding two of the batch's adapters: q_proj, v_proj and down_proj of both layers (all7, qvd),
    # k_proj, o_proj and up_proj of layer 1 (all7, late): 9 batched calls
    assert len(calls) == (9 if form == "batched" else 0)
    for name in set(ROWS):
        rows = [i for i, r in enumerate(ROWS) if r == name]
        want = forward(alone(saved, name), ids, mask)[rows]
        if name is None and not graph_safe:
            assert torch.equal(got[rows], want)
            continue
        ref = forward(alone(saved, name, torch.float64), ids, mask)[rows]
        assert (want.double() - ref).abs().max() > 0 or name is None     # fp32 and float64 runs do differ
        tol = 1e-4 * ref.abs().max()
        assert (got[rows].double() - ref).abs().max() <= tol, name
        assert (got[rows] - want).abs().max() <= tol, name
    assert not torch.allclose(got[0], forward(alone(saved, None), ids, mask)[0], atol=1e-2)   # adapters act


def test_mixed_batch_over_an_nf4_base(saved):
    """Over a 4-bit base (--quantize nf4): each row, a DoRA adapter's too, gives its adapter alone on the
    same 4-bit base, rows with no adapter the 4-bit base bit for bit."""
    root, _ = saved
    names = [*ADAPTERS, "dora"]                      # a DoRA adapter too: its norm from the dequantized rows
    mixed_rows = ROWS + ["dora"]
    prompts, ids, mask = batch(len(mixed_rows))
    nf4 = lambda: load_model(root / "base", torch.float32, quantize="nf4").eval()
    model = load_adapters(nf4(), {n: root / n for n in names})
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, NF4Weight)
    with adapter_rows(model, mixed_rows):
        got = forward(model, ids, mask)
    for name in set(mixed_rows):
        rows = [i for i, r in enumerate(mixed_rows) if r == name]
        want = forward(nf4() if name is None else load_adapter(nf4(), root / name), ids, mask)[rows]
        if name is None:
            assert torch.equal(got[rows], want)
        else:
            assert (got[rows] - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_greedy_tokens_with_left_padding_and_eos(saved):
    """Generation over a mixed batch: each row's tokens equal its adapter's tokens for that prompt alone;
    a row that reaches EOS stops there while the others go on."""
    prompts, _, _ = batch(seed=5)
    model = mixed(saved)
    got = generate(model, prompts, 10, eos_token_id=(), pad_token_id=0, adapters=ROWS)
    singles = {}
    for i, (p, name) in enumerate(zip(prompts, ROWS)):
        singles[i] = generate(alone(saved, name), [p], 10, eos_token_id=(), pad_token_id=0).tokens[0]
        assert got.tokens[i] == singles[i], (i, name)
    assert len({tuple(t) for t in got.tokens}) > 2
    # EOS per row: make row 2's third token an end of sequence.
    eos = singles[2][2]
    got = generate(model, prompts, 10, eos_token_id=eos, pad_token_id=0, adapters=ROWS)
    for i in range(len(prompts)):
        want = singles[i][:singles[i].index(eos)] if eos in singles[i] else singles[i]
        assert got.tokens[i] == want and got.stopped[i] == (eos in singles[i])
    assert got.stopped[2] and len(got.tokens[2]) == 2


def test_one_adapter_for_every_row_is_the_single_adapter_path(saved):
    prompts, ids, mask = batch()
    model = mixed(saved)
    with adapter_rows(model, ["qvd"] * len(ROWS)):
        got = forward(model, ids, mask)
    assert torch.allclose(got, forward(alone(saved, "qvd"), ids, mask), rtol=0, atol=1e-5)
    assert torch.equal(forward(model, ids, mask), forward(alone(saved, None), ids, mask))   # no index: base


def test_stacks_pad_ranks_and_mark_untargeted_modules(saved):
    model = mixed(saved)
    assert adapter_names(model) == list(ADAPTERS)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    assert len(layers) == 14                                  # 7 projections × 2 layers: all7 targets them all
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.ranks == [8, 6, 0] and down.present == [True, True, False]
    assert down.lora_A.shape == (3, 8, 84) and down.lora_Bt.shape == (3, 8, 48)
    assert torch.count_nonzero(down.lora_A[1, 6:]) == 0 and torch.count_nonzero(down.lora_Bt[1, 6:]) == 0
    k1 = layers["model.layers.1.self_attn.k_proj"]
    assert k1.present == [True, False, True] and k1.scalings[2] == pytest.approx(5 / 3)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("form", ["grouped", "batched", "masked"])
def test_dora_adapters_in_a_mixed_batch(saved, form, monkeypatch):
    """A DoRA adapter beside plain ones: its rows give the DoRA model alone (g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b,
    g fixed at load), the others theirs, base rows the base's (bit for bit off the masked path)."""
    root, state = saved
    rows = ["dora", None, "all7", "dora", "qvd", None, "all7"]
    prompts, ids, mask = batch()
    model = load_adapters(fresh(state), {n: root / n for n in ("all7", "dora", "qvd")})
    if form == "grouped":
        monkeypatch.setattr(serving_rows, "MAX_PADDING", 0.0)
    backend.set_graph_safe(form == "masked")
    try:
        with adapter_rows(model, rows):
            got = forward(model, ids, mask)
    finally:
        backend.set_graph_safe(False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.dora == [False, True, False] and not torch.equal(q.dora_scale[1], torch.ones_like(q.dora_scale[1]))
    for name in set(rows):
        idx = [i for i, r in enumerate(rows) if r == name]
        want = forward(alone(saved, name), ids, mask)[idx]
        if name is None and form != "masked":
            assert torch.equal(got[idx], want)
        else:
            assert (got[idx] - want).abs().max() <= 1e-4 * want.abs().max(), name
    lora_only = forward(alone_lora_of(saved, "dora"), ids, mask)[[0, 3]]
    assert not torch.allclose(got[[0, 3]], lora_only, atol=1e-3)            # the magnitudes act


def alone_lora_of(saved, name):
    """The DoRA adapter's A and B as a plain LoRA adapter (its magnitudes dropped)."""
    root, state = saved
    m = fresh(state)
    apply_lora(m, LoRAConfig(r=4, lora_alpha=8, target_modules=DORA.target_modules))
    dora = alone(saved, name)
    with torch.no_grad():
        mine = dict(m.named_parameters())
        for n, p in dora.named_parameters():
            if n in mine and "lora_" in n:
                mine[n].copy_(p)
    return m.eval()


@pytest.mark.parametrize("form", ["grouped", "batched", "masked"])
def test_dora_rows_with_a_bias_match_float64(form, monkeypatch):
    """MultiLoRALinear with a bias and two DoRA adapters of three: b + g_k ⊙ (x Wᵀ + s_k·x A_kᵀ B_kᵀ) per row
    against float64; rows of the plain adapter get no scale; rows without an adapter are the base."""
    torch.manual_seed(6)
    n, r, inp, out, B, T = 3, 5, 45, 29, 7, 2
    A, Bt = torch.randn(n, r, inp), torch.randn(n, r, out)
    g = torch.rand(n, out) + 0.5
    g[1] = 1
    base = nn.Linear(inp, out)
    state = ServingState(["a", "b", "c"])
    layer = MultiLoRALinear(base, A, Bt, [r] * n, [1.5, 0.5, 2.0], [True] * n, state, dora_scale=g.clone(),
                            dora=[True, False, True])
    ids = torch.tensor([0, 2, -1, 1, 0, 2, 1])
    x = torch.randn(B, T, inp)
    state.current = RowIndex(ids, n, state)
    if form == "grouped":
        monkeypatch.setattr(serving_rows, "MAX_PADDING", 0.0)
    backend.set_graph_safe(form == "masked")
    try:
        with torch.no_grad():
            got = layer(x)
    finally:
        backend.set_graph_safe(False)
    x64, W64, b64 = x.double(), base.weight.double(), base.bias.double()
    for row, k in enumerate(ids.tolist()):
        if k < 0:
            want = x64[row] @ W64.t() + b64
        else:
            z = x64[row] @ W64.t() + [1.5, 0.5, 2.0][k] * (x64[row] @ A[k].double().t()) @ Bt[k].double()
            want = b64 + g[k].double() * z
        assert (got[row].double() - want).abs().max() <= 1e-5 * want.abs().max(), (form, row)


def test_batched_plans():
    """Which rows the batched form gathers and adds back, and where it leaves the batch to the grouped form."""
    every = (True,) * 4
    plan = RowIndex(torch.tensor([0, 1, 2, 3]), 4).batched(4, torch.device("cpu"), every)
    assert (plan.ks, plan.adapters, plan.G, plan.R) == ((0, 1, 2, 3), slice(0, 4), 4, 1)
    assert plan.gather is None and plan.rows is None and plan.slots is None          # x and y as they are
    plan = RowIndex(torch.tensor([2, 0, -1, 2, 0]), 4).batched(10, torch.device("cpu"), every)   # T = 2
    assert plan.ks == (0, 2) and plan.adapters.tolist() == [0, 2] and plan.R == 4
    assert plan.gather.tolist() == [2, 3, 8, 9, 0, 1, 6, 7] == plan.rows.tolist() and plan.slots is None
    plan = RowIndex(torch.tensor([1, 1, 1, 2]), 4).batched(4, torch.device("cpu"), every)
    assert plan.adapters == slice(1, 3) and plan.R == 3
    assert plan.gather.tolist() == [0, 1, 2, 3, 3, 3] and plan.slots.tolist() == [0, 1, 2, 3]
    assert plan.rows.tolist() == [0, 1, 2, 3]
    assert RowIndex(torch.tensor([0, 0, 0, 0, 0, 1]), 4).batched(6, torch.device("cpu"), every) is None
    assert RowIndex(torch.tensor([0, 1, 1]), 4).batched(3, torch.device("cpu"), (True, False, True, True)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_form_matches_float64(dtype):
    """MultiLoRALinear's batched form (ranks 5, 2 and 7 padded to 7, the stacks in float32, x in `dtype`)
    against each row's LoRA term in float64; rows without an adapter, and rows of an adapter the module
    does not hold, are the base bit for bit."""
    torch.manual_seed(5)
    n, r_max, inp, out, B, T = 4, 7, 45, 29, 9, 3
    ranks, scalings, present = [5, 2, 7, 0], [1.5, 0.75, 2.0, 1.0], [True, True, True, False]
    A, Bt = torch.randn(n, r_max, inp), torch.randn(n, r_max, out)
    for k, r in enumerate(ranks):
        A[k, r:], Bt[k, r:] = 0, 0
    base = nn.Linear(inp, out).to(dtype)
    state = ServingState([f"a{k}" for k in range(n)])
    layer = MultiLoRALinear(base, A, Bt, ranks, scalings, present, state)
    ids = torch.tensor([2, 0, -1, 1, 2, 3, 0, 2, 1])
    x = torch.randn(B, T, inp).to(dtype)
    state.current = RowIndex(ids, n, state)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving_layer, "batched_lora_", lambda *a: calls.append(1) or batched_lora_(*a))
        with torch.no_grad():
            got = layer(x)
    assert calls
    base_out = base(x)
    x64 = x.double()
    for b, k in enumerate(ids.tolist()):
        if k < 0 or not present[k]:
            assert torch.equal(got[b], base_out[b])
            continue
        want = base_out[b].double() + scalings[k] * (x64[b] @ A[k].double().t()) @ Bt[k].double()
        tol = (1e-5 if dtype == torch.float32 else 2e-2) * want.abs().max()
        assert (got[b].double() - want).abs().max() <= tol


def test_bad_input_is_one_line_and_changes_nothing(saved):
    root, state = saved
    model = fresh(state)
    before = {n for n, _ in model.named_modules()}
    cases = [
        ({"a": root / "all7", "b": root / "other_base"}, "shape"),
        ({"a": root / "all7", "b": root / "missing"}, "no adapter_config.json"),
        ([("a", root / "all7"), ("a", root / "qvd")], "'a' given twice"),
        ({"": root / "all7"}, "non-empty name"),
    ]
    for adapters, needle in cases:
        with pytest.raises(LoRAError, match=needle) as e:
            load_adapters(model, adapters)
        assert "\n" not in str(e.value)
        assert {n for n, _ in model.named_modules()} == before and not hasattr(model, "serving_state")
    model = mixed(saved)
    with pytest.raises(LoRAError, match="unknown adapter 'nope'.*loaded: all7, qvd, late"):
        with adapter_rows(model, ["all7", "nope"]):
            pass
    with pytest.raises(LoRAError, match="once"):
        load_adapters(model, {"x": root / "all7"})
    prompts, _, _ = batch()
    with pytest.raises(LoRAError, match="one per prompt"):
        generate(model, prompts, 2, adapters=ROWS[:2])


# -- the no-gradient single-adapter path (lora/core/infer_op.py) -----------------------------------

def make_layer(inp=45, out=29, r=5, bias=True, dtype=torch.float32):
    layer = LoRALinear(nn.Linear(inp, out, bias=bias, dtype=dtype), r=r, alpha=7.0, init_lora_weights=False)
    return layer


@pytest.mark.parametrize("shape, bias", [((1, 1, 45), True), ((3, 7, 45), False), ((13, 45), True)])
def test_fast_path_matches_float64_and_the_autograd_op(shape, bias):
    torch.manual_seed(1)
    layer = make_layer(bias=bias)
    x = torch.randn(shape)
    W, b, A, B, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    ref = x.double() @ W.double().T + s * (x.double() @ A.double().T) @ B.double().T
    ref = ref + b.double() if bias else ref
    assert infer_op.wants_fast_path(layer, x, 0.0) is False          # A, B require grad, grad mode on
    with torch.no_grad():
        assert infer_op.wants_fast_path(layer, x, 0.0)
        y = layer(x)
        slow = lora_linear_torch(x, W, b, A, B, s)
    assert y.shape == (*shape[:-1], 29)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(y, slow, rtol=0, atol=1e-5)


def test_fast_path_cast_cache_follows_parameter_updates():
    """A bf16 base with an fp32 adapter: the cast adapter is cached and refreshed after any in-place
    update or a new tensor for the parameter."""
    torch.manual_seed(2)
    layer = make_layer(dtype=torch.bfloat16)
    x = torch.randn(4, 45).bfloat16()

    def want():
        A, B = layer.lora_A.detach().bfloat16(), layer.lora_B.detach().bfloat16()
        return torch.addmm(nn.functional.linear(x, layer.weight, layer.bias), x @ A.T, B.T.contiguous(),
                           alpha=layer.scaling)

    with torch.no_grad():
        assert torch.equal(layer(x), want())
        layer.lora_B.mul_(-2.0)                                      # in place: _version moves
        assert torch.equal(layer(x), want())
        layer.lora_A = nn.Parameter(torch.randn_like(layer.lora_A))  # a new tensor object
        assert torch.equal(layer(x), want())
        layer.lora_B.data = torch.randn_like(layer.lora_B)          # new storage under the same object
        assert torch.equal(layer(x), want())
        layer.lora_B.data.mul_(3.0)                                  # bypasses the version counter:
        infer_op.drop_cast_cache(layer)                              # the documented way to refresh
        assert torch.equal(layer(x), want())


def test_fast_path_is_not_taken_where_it_does_not_apply():
    layer = make_layer()
    x = torch.randn(2, 45)
    with torch.no_grad():
        assert not infer_op.wants_fast_path(layer, x, 0.1)              # dropout
        layer.lora_magnitude_vector = nn.Parameter(torch.ones(29))      # a DoRA layer: another formula
        assert not infer_op.wants_fast_path(layer, x, 0.0)
    del layer.lora_magnitude_vector
    for p in layer.parameters():
        p.requires_grad_(False)
    assert infer_op.wants_fast_path(layer, x, 0.0)                    # nothing requires grad
    assert not infer_op.wants_fast_path(layer, x.requires_grad_(), 0.0)


# -- infer.py: --adapter NAME=DIR repeated, .jsonl prompts, --jsonl output ---------------------------

JSONL_ROWS = [("The cat", "all7"), ("a", None), ("Once upon a time", "qvd"), ("xyz 123!", "late"),
              ("hello", "qvd")]


def test_cli_mixed_adapters_jsonl(saved, tmp_path, capsys):
    """Replies in input order, each the reply its adapter gives alone (complete() on a single-adapter
    model), in batches that mix adapters."""
    root, _ = saved
    lines = [json.dumps({"prompt": p} if a is None else {"prompt": p, "adapter": a}) for p, a in JSONL_ROWS]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--model", root / "base", "--prompt-file", tmp_path / "p.jsonl", "--max-new-tokens", 5,
            "--batch-size", 3, "--jsonl"] + [a for n in ADAPTERS for a in ("--adapter", f"{n}={root / n}")]
    assert infer.main(list(map(str, args))) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(o["prompt"], o["adapter"]) for o in out] == JSONL_ROWS
    for o in out:
        model, tok = load_for_generation(root / "base", None if o["adapter"] is None else root / o["adapter"])
        assert o["reply"] == complete(model, tok, [o["prompt"]], 5)[0][0], o


def test_complete_with_buckets_fills_short_batches_with_adapters(saved):
    """complete() over named adapters: static-shape buckets (a short last batch filled with copies of
    its first row, adapter included) give the same replies as dynamic shapes and as batch size 1."""
    root, _ = saved
    model, tok = load_for_generation(root / "base", adapters={n: root / n for n in ADAPTERS})
    texts, names = [p for p, _ in JSONL_ROWS], [a for _, a in JSONL_ROWS]
    want, _ = complete(model, tok, texts, 5, batch_size=1, adapters=names)
    assert complete(model, tok, texts, 5, batch_size=3, adapters=names)[0] == want
    assert complete(model, tok, texts, 5, batch_size=3, bucket=8, adapters=names)[0] == want
    with pytest.raises(LoRAError, match="unknown adapter 'nope'"):
        complete(model, tok, texts[:1], 5, adapters=["nope"])


@pytest.mark.parametrize("lines, flags, needle", [
    (['{"prompt": "a", "adapter": "nope"}'], ["x=all7"], "p.jsonl:1: unknown adapter 'nope' (loaded: x)"),
    (['{"prompt": "a"}', '{"prompt": "b", "adapter": "x"}'], ["all7"], "p.jsonl:2: unknown adapter 'x' (no named"),
    (['{"prompt": "a", "lora": "x"}'], ["x=all7"], "p.jsonl:1: unknown key(s) 'lora'"),
    (['{"prompt": ""}'], ["x=all7"], "p.jsonl:1: \"prompt\" must be a non-empty string"),
    (['["a"]'], ["x=all7"], "p.jsonl:1: expected a JSON object"),
    (['{"prompt": "a"}'], ["x=all7", "x=qvd"], "name 'x' given twice"),
    (['{"prompt": "a"}'], ["all7", "qvd"], "need a name each"),
    (['{"prompt": "a"}'], ["x=all7", "y=other_base"], "shape"),
])
def test_cli_bad_input_one_line(saved, tmp_path, capsys, lines, flags, needle):
    root, _ = saved
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--model", str(root / "base"), "--prompt-file", str(tmp_path / "p.jsonl")]
    for f in flags:
        name, eq, d = f.rpartition("=")
        args += ["--adapter", f"{name}={root / d}" if eq else str(root / d)]
    assert infer.main(args) == 2
    err = capsys.readouterr()
    assert err.out == "" and err.err.count("\n") == 1 and err.err.startswith("error: "), err.err
    assert needle in err.err, err.err
