"""What a LoRA adapter learned, measured (the LoRA paper's §7 analyses), for any PEFT-format adapter.

    factors.py         read an adapter: per module A (r, in), B (out, r), scaling; module-name helpers
    spectrum.py        ΔW = scaling · B A: SVD from the factors (never out × in), norm, stable/effective rank
    similarity.py      φ(i, j), the normalised subspace similarity of two adapters' A (and B) factors
    base.py            the base checkpoint's weights for the adapted modules, checked, streamed one at a time
    amplification.py   ‖ΔW‖/‖W‖ and Table 7: ‖Uᵀ W V‖_F for ΔW's, W's own and random directions
    analyze.py         all of the above, module by module: an Analysis
    curves.py          a training run's metrics.jsonl
    report.py          report.json, report.md, the stdout table, where the output may go
    figures.py         the PNG figures (matplotlib, optional)

`analyze.py` at the top of the repository is the command line over this package.
"""
from .amplification import BaseMeasures, base_measures, projection_norm, random_directions, top_directions
from .analyze import Analysis, ModuleAnalysis, analyze_adapter
from .curves import Curves, read_curves
from .factors import Factors, read_factors
from .report import check_out, curves_table, default_out, report_json, summary_table, write_report
from .similarity import adapter_similarity, random_similarity, subspace_similarity
from .spectrum import Spectrum, delta_svd, effective_rank, stable_rank

__all__ = [
    "Analysis", "ModuleAnalysis", "analyze_adapter", "Factors", "read_factors", "Spectrum", "delta_svd",
    "stable_rank", "effective_rank", "subspace_similarity", "adapter_similarity", "random_similarity",
    "BaseMeasures", "base_measures", "projection_norm", "top_directions", "random_directions",
    "Curves", "read_curves", "report_json", "summary_table", "curves_table", "default_out", "check_out",
    "write_report",
]
