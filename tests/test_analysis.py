"""lora.analysis and analyze.py: closed-form cases with known answers, float64 references, a real
PEFT-written adapter, the report's exact shape, and bad input as one line with nothing written."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import lora
from lora import LoRAConfig, LoRAError
from lora.analysis import (
    analyze_adapter, base_measures, delta_svd, effective_rank, projection_norm, random_directions,
    random_similarity, read_curves, stable_rank, subspace_similarity, top_directions,
)
from conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
F64 = dict(dtype=torch.float64)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) with orthonormal columns (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, **F64)).Q


def factors_with(sigma, out_f: int, in_f: int, seed: int = 0):
    """B (out, r), A (r, in) with B A = P diag(σ) Qᵀ for orthonormal P, Q (σ in any order)."""
    sigma = torch.tensor(sigma, **F64)
    P, Q = orthonormal(out_f, len(sigma), seed), orthonormal(in_f, len(sigma), seed + 1)
    return (sigma.sqrt()[:, None] * Q.T) * 3.0, (P * sigma.sqrt()) / 3.0, P, Q


# -- ΔW's spectrum --------------------------------------------------------------------------------
def test_spectrum_of_constructed_factors_has_the_chosen_singular_values():
    sigma, scaling = [0.3, 2.5, 1.1, 0.05, 0.7], 1.75
    A, B, P, Q = factors_with(sigma, 41, 29)
    s = delta_svd(A, B, scaling)
    expected = torch.tensor(sorted(sigma, reverse=True), **F64) * scaling
    torch.testing.assert_close(s.S, expected, rtol=1e-13, atol=1e-14)
    assert s.norm == pytest.approx(scaling * math.sqrt(sum(x * x for x in sigma)), rel=1e-13)
    # U, V are P, Q's columns reordered by σ (up to sign, paired).
    order = torch.tensor(sigma).argsort(descending=True)
    torch.testing.assert_close((s.U.T @ P[:, order]).abs(), torch.eye(5, **F64), atol=1e-12, rtol=0)
    torch.testing.assert_close((s.U.T @ P[:, order]).diagonal() * (s.V.T @ Q[:, order]).diagonal(),
                               torch.ones(5, **F64), atol=1e-12, rtol=0)
    p = expected / expected.sum()
    assert stable_rank(s.S) == pytest.approx((expected ** 2).sum().item() / expected[0].item() ** 2, rel=1e-13)
    assert effective_rank(s.S) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-13)


@pytest.mark.parametrize("sigma, ranks", [([1.3] * 6, 6.0), ([4.0, 0, 0, 0], 1.0), ([0.0] * 3, 0.0)])
def test_flat_rank_one_and_zero_spectra(sigma, ranks):
    A, B, _, _ = factors_with(sigma, 17, 13)
    s = delta_svd(A, B, 1.0)
    assert stable_rank(s.S) == pytest.approx(ranks, abs=1e-12)
    assert effective_rank(s.S) == pytest.approx(ranks, abs=1e-9)
    assert len(s.S) == len(sigma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f, r, in_f", [(37, 5, 23), (11, 7, 53), (6, 9, 5)])
def test_factor_svd_equals_dense_float64_svd(dtype, out_f, r, in_f):
    g = torch.Generator().manual_seed(out_f * r)
    A = torch.randn(r, in_f, generator=g).to(dtype)
    B = torch.randn(out_f, r, generator=g).to(dtype)
    s = delta_svd(A, B, 0.625)
    dense = 0.625 * B.double() @ A.double()
    reference = torch.linalg.svdvals(dense)[:r]
    reference = torch.cat([reference, reference.new_zeros(r - len(reference))])   # r > min(out, in): zeros
    torch.testing.assert_close(s.S, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.U @ torch.diag(s.S[:s.U.shape[1]]) @ s.V.T, dense, rtol=0, atol=1e-12)
    k = s.U.shape[1]
    torch.testing.assert_close(s.U.T @ s.U, torch.eye(k, **F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.V.T @ s.V, torch.eye(k, **F64), rtol=0, atol=1e-12)


# -- subspace similarity --------------------------------------------------------------------------
def test_phi_is_one_for_the_same_row_space_under_a_rotation():
    from lora.analysis.similarity import adapter_similarity
    r = 6
    A1, B1, _, _ = factors_with([3.0, 2.2, 1.6, 1.1, 0.7, 0.4], 31, 27)     # distinct σ: directions defined
    R = orthonormal(r, r, seed=9)                                              # an r × r rotation
    phi = adapter_similarity(A1, B1, R @ A1, B1 @ R.T)
    for which in "AB":
        assert phi[which].shape == (r, r)
        torch.testing.assert_close(phi[which], torch.ones(r, r, **F64), rtol=0, atol=1e-10)


def test_phi_is_zero_for_orthogonal_spaces_and_counts_containment():
    from lora.analysis.similarity import row_space
    g = torch.Generator().manual_seed(8)
    Q = orthonormal(40, 20, seed=3)
    A1 = torch.randn(4, 7, generator=g, **F64) @ Q[:, :7].T         # a 4-d row space inside span Q[:, :7]
    A2 = torch.randn(9, 13, generator=g, **F64) @ Q[:, 7:].T        # ⟂ to it
    phi = subspace_similarity(row_space(A1), row_space(A2))
    assert phi.shape == (4, 9)
    assert phi.abs().max().item() < 1e-12
    A3 = torch.randn(9, 9, generator=g, **F64) @ Q[:, :9].T         # row space span Q[:, :9] ⊃ A1's
    phi = subspace_similarity(row_space(A1), row_space(A3))
    assert phi[-1, -1].item() == pytest.approx(1.0, abs=1e-12)      # φ(r₁, r₂) = r₁ / min(r₁, r₂)


def test_phi_prefix_sums_by_hand():
    e = torch.eye(3, **F64)
    U1 = e[:, :2]                                                  # span{e1, e2}
    U2 = torch.stack([(e[0] + e[2]) / math.sqrt(2), e[1]], dim=1)  # (e1 + e3)/√2, e2
    expected = torch.tensor([[0.5, 0.5], [0.5, 1.5 / 2]], **F64)   # φ(2, 2) = (½ + 1) / 2
    torch.testing.assert_close(subspace_similarity(U1, U2), expected, rtol=0, atol=1e-15)


def test_random_subspace_baselines_match_their_expectations():
    n, r1, r2, draws = 23, 3, 5, 400
    mean_phi = sum(subspace_similarity(orthonormal(n, r1, 2 * s), orthonormal(n, r2, 2 * s + 1))
                   for s in range(draws)) / draws
    torch.testing.assert_close(mean_phi, random_similarity(r1, r2, n), rtol=0.08, atol=0)
    # E‖Uᵀ W V‖²_F = k² ‖W‖²_F / (out · in) for random U (out, k), V (in, k)
    W = torch.randn(19, 14, generator=torch.Generator().manual_seed(5), **F64)
    W[:, 0] *= 8                                                   # far from isotropic
    k = 3
    mean_sq = sum(projection_norm(W, *random_directions(19, 14, k, seed=s)) ** 2 for s in range(draws)) / draws
    expected = k ** 2 * torch.linalg.matrix_norm(W).item() ** 2 / (19 * 14)
    assert mean_sq == pytest.approx(expected, rel=0.08)


# -- against the base -----------------------------------------------------------------------------
def test_amplification_on_a_constructed_weight():
    out_f, in_f, k = 33, 26, 3
    P, Q = orthonormal(out_f, in_f, 11), orthonormal(in_f, in_f, 12)
    w = torch.cat([torch.tensor([40.0, 30.0, 20.0]), torch.linspace(2.0, 0.1, in_f - 3)]).double()
    W = P @ torch.diag(w) @ Q.T                                    # singular values w, a gap after 3
    picked, d, scaling = [15, 19, 23], torch.tensor([0.9, 0.5, 0.2], **F64), 2.0
    B, A = P[:, picked] * d, Q[:, picked].T                         # ΔW = 2 Σ d_i p_i q_iᵀ, W weak there
    m = base_measures(W, delta_svd(A, B, scaling))
    delta_norm = scaling * d.norm().item()
    assert m.weight_norm == pytest.approx(w.norm().item(), rel=1e-13)
    assert m.delta_norm == pytest.approx(delta_norm, rel=1e-13)
    assert m.delta_directions == pytest.approx(w[picked].norm().item(), rel=1e-12)
    assert m.weight_directions == pytest.approx(w[:k].norm().item(), rel=1e-12)
    assert m.amplification == pytest.approx(delta_norm / w[picked].norm().item(), rel=1e-12)
    assert m.relative_norm == pytest.approx(delta_norm / w.norm().item(), rel=1e-13)
    assert m.random_expected == pytest.approx(k * w.norm().item() / math.sqrt(out_f * in_f), rel=1e-13)


def test_randomized_svd_against_dense_svd():
    g = torch.Generator().manual_seed(4)
    out_f, in_f, k = 151, 97, 7
    P, Q = orthonormal(out_f, in_f, 21), orthonormal(in_f, in_f, 22)
    W = P @ torch.diag(0.85 ** torch.arange(in_f, **F64)) @ Q.T    # a decaying spectrum, as trained weights have
    U, V = top_directions(W, k)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(W, full_matrices=False)
    assert projection_norm(W, U, V) == pytest.approx(S_ref[:k].norm().item(), rel=1e-8)
    assert subspace_similarity(U, U_ref[:, :k])[-1, -1].item() == pytest.approx(1.0, abs=1e-6)
    # No gap at all (a Gaussian matrix): never above the exact value, and close to it.
    W = torch.randn(out_f, in_f, generator=g, **F64)
    exact = torch.linalg.svdvals(W)[:k].norm().item()
    got = projection_norm(W, *top_directions(W, k))
    assert exact * (1 - 1e-2) < got <= exact * (1 + 1e-12)


# -- real adapters --------------------------------------------------------------------------------
def _base(path: Path, dtype=torch.float32, **cfg) -> Path:
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**cfg)).to(dtype).save_pretrained(path, max_shard_size="60KB")   # sharded
    return path


def _adapter(path: Path, seed: int = 1, **cfg) -> Path:
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    torch.manual_seed(seed)
    lora.save_adapter(lora.apply_lora(model, LoRAConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **cfg})), path)
    return path


def test_peft_written_adapter_against_dense_float64(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM
    base = _base(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    pmodel = peft.get_peft_model(model, peft.LoraConfig(
        task_type="CAUSAL_LM", r=5, lora_alpha=7, use_rslora=True, rank_pattern={"up_proj": 3},
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pmodel.save_pretrained(tmp_path / "adapter")
    analysis = analyze_adapter(tmp_path / "adapter", base=base)

    expected = {}
    for name, module in pmodel.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A, B = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            expected[name.removeprefix("base_model.model.")] = (module.scaling["default"], A, B, module.base_layer.weight.double())
    assert list(analysis.modules) == sorted(expected, key=lora.analysis.factors.module_order)
    for name, (scaling, A, B, W) in expected.items():
        m, dense = analysis.modules[name], scaling * B @ A
        assert m.r == A.shape[0] and m.scaling == pytest.approx(scaling, rel=1e-15)
        torch.testing.assert_close(torch.tensor(m.singular_values, **F64), torch.linalg.svdvals(dense)[:m.r], rtol=1e-11, atol=1e-12)
        assert m.delta_norm == pytest.approx(torch.linalg.matrix_norm(dense).item(), rel=1e-12)
        assert m.base.relative_norm == pytest.approx((dense.norm() / W.norm()).item(), rel=1e-12)
        U, S, Vh = torch.linalg.svd(dense)
        amplification = dense.norm().item() / (U[:, :m.r].T @ W @ Vh[:m.r].T).norm().item()
        assert m.base.amplification == pytest.approx(amplification, rel=1e-8)


def _cli():
    spec = importlib.util.spec_from_file_location("analyze_cli", ROOT / "analyze.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    run = root / "run"
    run.mkdir()
    records = [{"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 900.0}
               for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.7}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')
    return {"base": _base(root / "base"), "a4": _adapter(root / "a4"), "a7": _adapter(root / "a7", seed=2, r=7, lora_alpha=14),
            "subset": _adapter(root / "subset", target_modules=["q_proj"]),
            "other_base": _base(root / "other_base", hidden_size=36), "run": run, "root": root}


def test_cli_report_has_exactly_the_documented_shape(work, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(work["a4"]), "--base", str(work["base"]), "--compare", str(work["a7"]), "--run", str(work["run"]),
            "--out", str(out), "--no-progress"]
    assert _cli().main(args) == 0
    stdout = capsys.readouterr().out
    assert "q_proj" in stdout and "amplification" in stdout and "phi_A(1,1)" in stdout and "eval_loss" in stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"adapter", "base", "compare", "modules", "similarity"}
    assert (report["adapter"], report["base"], report["compare"]) == (str(work["a4"]), str(work["base"]), str(work["a7"]))
    assert len(report["modules"]) == 3 * 7 and set(report["similarity"]) == set(report["modules"])
    for name, m in report["modules"].items():
        assert set(m) == {"r", "scaling", "delta_norm", "singular_values", "stable_rank", "effective_rank",
                          "relative_norm", "amplification"}
        assert m["r"] == 4 and m["scaling"] == 2.0 and len(m["singular_values"]) == 4
        assert m["singular_values"] == sorted(m["singular_values"], reverse=True)
        assert all(isinstance(m[k], float) for k in ("delta_norm", "stable_rank", "effective_rank", "relative_norm", "amplification"))
        phi = report["similarity"][name]
        assert set(phi) == {"A", "B"} and len(phi["A"]) == 4 and all(len(row) == 7 for row in phi["A"] + phi["B"])
        assert all(0 <= v <= 1 + 1e-12 for row in phi["A"] + phi["B"] for v in row)
    assert {"report.md", "norms.png", "spectra.png", "similarity.png", "similarity_map.png",
            "curves.png"} <= {p.name for p in out.iterdir()}

    # Without a base or compare the same keys, with nulls and an empty similarity; an earlier analysis is replaced.
    assert _cli().main([str(work["a4"]), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["base"] is None and report["compare"] is None and report["similarity"] == {}
    assert all(m["relative_norm"] is None and m["amplification"] is None for m in report["modules"].values())
    assert not (out / "curves.png").exists()


def test_without_matplotlib_one_line_says_how_to_get_the_figures(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "out"
    assert _cli().main([str(work["a4"]), "--run", str(work["run"]), "--out", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l for l in lines if "pip install" in l] == ['figures need matplotlib: pip install -e ".[plot]"']
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


def test_run_alone_and_default_out_beside_the_input(work, capsys):
    assert _cli().main(["--run", str(work["run"]), "--no-progress"]) == 0
    out = work["root"] / "run-analysis"
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.md"]
    curves = read_curves(work["run"])                  # the cut-short last line is skipped
    assert [v for _, v in curves.series["eval_loss"]] == [0.7] and len(curves.series["loss"]) == 5
    assert _cli().main([str(work["a7"]), "--no-progress"]) == 0
    assert (work["root"] / "a7-analysis" / "report.json").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("case, message", [
    ("not_adapter", "not an adapter directory"),
    ("other_base", "is 36 × 36 but the adapter's ΔW"),
    ("missing_module", "has no model.layers.0.self_attn.k_proj"),
    ("out_inside_adapter", "is inside the input"),
    ("out_over_other_dir", "is not an earlier analysis"),
    ("out_holds_run", "holds the input"),
    ("bad_metrics", "not a metrics record"),
    ("base_without_adapter", "--base and --compare analyse an ADAPTER"),
    ("unknown_flag", "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_nothing_written(work, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    a4, run = str(work["a4"]), str(work["run"])
    if case == "bad_metrics":
        run = tmp_path / "badrun"
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 2, "loss": 1}\n')
    if case == "out_over_other_dir":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    args = {
        "not_adapter": [str(work["run"]), "--out", str(out)],
        "other_base": [a4, "--base", str(work["other_base"]), "--out", str(out)],
        "missing_module": [a4, "--compare", str(work["subset"]), "--out", str(out)],
        "out_inside_adapter": [a4, "--out", str(work["a4"] / "analysis")],
        "out_over_other_dir": [a4, "--out", str(out)],
        "out_holds_run": ["--run", run, "--out", str(work["root"])],
        "bad_metrics": ["--run", str(run), "--out", str(out)],
        "base_without_adapter": ["--base", str(work["base"]), "--out", str(out)],
        "unknown_flag": [a4, "--rank", "3"],
    }[case]
    before = sorted(p.name for p in work["root"].iterdir())
    assert _exit_code(args + ["--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert sorted(p.name for p in work["root"].iterdir()) == before
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not (work["a4"] / "analysis").exists()


def _exit_code(args: list[str]) -> int:
    """analyze.py's exit status, whether main returns it or argparse exits."""
    try:
        return _cli().main(args)
    except SystemExit as e:
        return e.code


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        _cli().main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("ADAPTER", "--base", "--compare", "--run", "--out", "--no-progress"):
        assert flag in text


def test_bf16_base_is_streamed_exactly(work, tmp_path):
    from safetensors.torch import load_file
    base = _base(tmp_path / "bf16", dtype=torch.bfloat16)
    weights = {}
    for f in base.glob("*.safetensors"):
        weights.update(load_file(f))
    analysis = analyze_adapter(work["a4"], base=base)
    for name, m in analysis.modules.items():
        assert m.base.weight_norm == pytest.approx(weights[f"{name}.weight"].double().norm().item(), rel=1e-14)


def test_bad_inputs_raise_lora_error(tmp_path, work):
    from lora.analysis import write_report
    with pytest.raises(LoRAError, match="not a directory"):
        analyze_adapter(tmp_path / "missing")
    with pytest.raises(LoRAError, match="no model.safetensors"):
        analyze_adapter(work["a4"], base=tmp_path)
    analysis = analyze_adapter(work["a4"])
    with pytest.raises(LoRAError, match="holds the input"):        # the library checks too, not only the CLI
        write_report(work["root"], analysis, None)
    assert (work["a4"] / "adapter_config.json").is_file()
    import json
    import shutil
    dora = tmp_path / "dora"
    shutil.copytree(work["a4"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoRAError, match="a DoRA adapter"):
        analyze_adapter(dora)
