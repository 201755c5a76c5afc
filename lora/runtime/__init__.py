"""The process the work runs in.

    device.py    CPU, CUDA and Gaudi (HPU): the hooks the loop and inference call; the --dtype names
    malloc.py    glibc: keep freed memory in the process between training steps
    progress.py  the one progress bar (tqdm, or a plain line)
    signals.py   Ctrl-C and SIGTERM as exceptions, or deferred to a safe point
    seed.py      seeds drawn on the host (dropout, sampling)
"""
