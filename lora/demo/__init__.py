"""The demo: a task a random Llama cannot do, learned by a LoRA adapter on 2 CPU cores.

    task.py        the task (a letter substitution), the random base, exact match
    tokenizer.py   the character tokenizer of the demo base
    train_demo.py  what `python train.py` runs with no --model and no --data
    infer_demo.py  what `python infer.py` runs with no --model
"""
