"""infer.py's work: generation with a KV cache, with an adapter or without.

    load.py      the model and tokenizer, the adapter applied (and merged on request), on its device
    prompts.py   prompt files, chat templates and formats, encoding
    generate.py  the generation loop (prefill, decode; greedy or sampled; static shapes); context and EOS
    complete.py  prompts in batches to replies, streaming text and timing
"""
