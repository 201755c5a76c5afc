"""What is read from and written to disk.

    adapter.py             PEFT's adapter format (adapter_config.json + adapter_model.safetensors)
    model_dir.py           a Hugging Face model directory: config, tokenizer, weights, its module tree
    safetensors_stream.py  safetensors headers and tensors read and written by offset, memory flat
    quantized.py           4-bit bases: quantized while read, or bitsandbytes 4-bit checkpoints as they are
    sharded_load.py        a process's rows of each tensor read by offset (--fsdp: each rank its shard)
    atomic.py              writes to a temporary path, renamed into place (crash-safe)
    lock.py                one writer per output: an flock'ed lock file beside it
"""
