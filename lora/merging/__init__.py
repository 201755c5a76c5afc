"""merge.py's work: adapters folded into a safetensors checkpoint, streaming tensor by tensor.

    streaming.py   merge_checkpoint: checks, then the write into a temporary directory
    plan.py        which adapter update goes into which weight, from the headers
    writer.py      the shards written in a background thread while the next weight is merged
    side_files.py  the index, config.json and the tokenizer files beside the shards
    verify.py      --verify: the merged model's logits against base + adapter
"""
