"""Training: `train(TrainConfig(...))`, what train.py runs.

    config.py       TrainConfig: every setting, with its flag's help text; validation, the run's fingerprint
    flags.py        train.py's flags, generated from TrainConfig and LoRAConfig
    data.py         data files -> fixed-shape token tensors with the trained tokens marked
    schedule.py     the plan in steps: total, warmup + cosine lr, the examples each step sees
    loop.py         train(): the loop, one step, the model loaded with its adapter
    evaluate.py     the token loss and the eval loss
    distributed.py  torchrun's environment and the collectives the loop makes
    fsdp.py         --fsdp: the frozen base sharded over the processes (FSDP2), the adapter replicated
    run_dir.py      the output directory: run.json, checkpoints, metrics.jsonl, eval.json
    fingerprint.py  digests of the data and model files, kept in run.json
"""
from .config import TrainConfig
from .loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
