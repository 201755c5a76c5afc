"""--fsdp: the base sharded with FSDP2 over 2 gloo processes; against one process, against data parallel,
resume after SIGKILL and SIGTERM, each rank's share of the base and of the bytes read, what it refuses."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora import LoRAConfig, LoRAError
from lora.storage.safetensors_stream import read_checkpoint
from lora.quant.linear import NF4Linear
from lora.quant.nf4 import quantize_nf4
from lora.quant.sharded import ShardedNF4Weight, double_quantized_scales
from lora.storage.model_dir import load_model
from lora.storage.sharded_load import read_nf4_blocks, read_rows
from lora.training import train
from lora.training.fsdp import check_fsdp
from test_qlora_load import base, bnb_dir  # noqa: F401  (fixtures: a bf16 base, bitsandbytes' 4-bit save of it)
from test_train import (ROOT, adapter, close, metrics, one_thread, tiny, tiny_args,  # noqa: F401  (fixtures)
                        tiny_config)
import train as train_cli

SHARE = re.compile(r"fsdp: rank (\d) of 2 holds ([\d,]+) of the base's ([\d,]+) bytes \(read ([\d,]+) bytes")


def torchrun(args, *, fsdp=True):
    """train.py under torchrun, 2 gloo processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *map(str, args), "--device", "cpu", *(["--fsdp"] if fsdp else [])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_with_workers(proc) -> None:
    """SIGKILL to torchrun's workers (they run in sessions of their own) and to torchrun."""
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    proc.kill()


def finished(proc) -> str:
    """The process's stderr, once it has exited 0."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def interrupt(args, out: Path, how) -> str:
    """train.py under torchrun into `out`, stopped by `how(proc)` once its first checkpoint (step 4) is
    written; returns its stderr."""
    proc = torchrun(args)
    first = out / "checkpoints" / "step-4" / "state.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    how(proc)
    _, err = proc.communicate(timeout=120)
    assert first.exists() and proc.returncode != 0, err[-3000:]
    assert not (out / "adapter").exists(), "the run finished before the signal; raise --max-steps"
    return err


def base_bytes(model_dir: Path) -> int:
    return sum(e.nbytes for s in read_checkpoint(model_dir)[0] for e in s.entries)


def test_two_fsdp_processes_match_one_process(tiny, tmp_path):
    """2 processes × batch 4 with the base sharded = one process × batch 8: losses, eval loss and adapter
    (fp32 tolerance). Each rank holds and reads about half of the base, and the checkpoints hold the
    adapter only. The one-process run has --fsdp too: with one process its shard is the whole base."""
    out2 = tmp_path / "fsdp"
    err = finished(torchrun(tiny_args(tiny, out2, "--max-steps", 4, "--batch-size", 4, "--log-every", 1,
                                      "--eval-data", tiny / "eval.jsonl", "--lora-r", 4, "--lora-alpha", 8,
                                      "--lora-dropout", 0, "--grad-checkpointing")))
    one = train(tiny_config(tiny, tmp_path / "one", max_steps=4, batch_size=8, eval_data=str(tiny / "eval.jsonl"),
                            fsdp=True, lora=LoRAConfig(r=4, lora_alpha=8)))
    assert json.loads((out2 / "eval.json").read_text())["eval_loss"] == pytest.approx(one.eval_loss, rel=1e-5)
    assert [r["loss"] for r in metrics(out2)] == pytest.approx([r["loss"] for r in metrics(one.out)], rel=1e-5)
    ta, tb = adapter(out2 / "adapter"), adapter(one.out / "adapter")
    assert close(ta, tb, 1e-4) and any(tb[k].abs().sum() > 0 for k in tb if "lora_B" in k)

    shares = {int(m[1]): [int(g.replace(",", "")) for g in m.groups()[1:]] for m in SHARE.finditer(err)}
    total = base_bytes(tiny / "base")                 # the file is fp32, as the run: bytes read = bytes held
    assert sorted(shares) == [0, 1]
    assert all(whole == total and 0.45 * total <= held <= 0.55 * total and read == held
               for held, whole, read in shares.values())
    assert sum(held for held, _, _ in shares.values()) == total
    ckpt = out2 / "checkpoints" / "step-4"
    assert {p.name for p in ckpt.iterdir()} == {"adapter", "trainer_state.pt", "state.json"}
    adapter_bytes = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    assert (ckpt / "trainer_state.pt").stat().st_size < 3 * adapter_bytes + 8192   # Adam's m, v: 2 × adapter


def test_fsdp_bf16_grad_checkpointing_is_data_parallel_bit_for_bit(tiny, tmp_path):
    """The all-gathered weights are the checkpoint's and the adapter is all-reduced as without --fsdp:
    the same adapter and losses, bit for bit, with bf16, activation checkpointing and dropout on."""
    args = lambda out: tiny_args(tiny, out, "--max-steps", 3, "--batch-size", 4, "--log-every", 1, "--dtype", "bf16",
                                 "--grad-checkpointing", "--lora-dropout", 0.1)
    finished(torchrun(args(tmp_path / "fsdp")))                 # one torchrun at a time (see below)
    finished(torchrun(args(tmp_path / "ddp"), fsdp=False))
    want, got = adapter(tmp_path / "ddp" / "adapter"), adapter(tmp_path / "fsdp" / "adapter")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in metrics(tmp_path / "fsdp")] == [r["loss"] for r in metrics(tmp_path / "ddp")]


def test_fsdp_resume_after_sigkill_or_sigterm_is_bit_identical(tiny, tmp_path, capsys):
    """SIGKILL to torchrun and both workers, or SIGTERM to torchrun (the ranks agree on a step, write its
    checkpoint and stop), then --resume: the adapter and every step's loss of an uninterrupted run."""
    args = lambda out: tiny_args(tiny, out, "--max-steps", 60, "--batch-size", 4, "--save-every", 4,
                                 "--log-every", 1, "--lora-dropout", 0.1)
    finished(torchrun(args(tmp_path / "ref")))
    # One torchrun at a time: agents started together may pick the same free port for their workers.
    for name, how in (("killed", kill_with_workers),
                      ("stopped", lambda p: p.send_signal(signal.SIGTERM))):
        err = interrupt(args(tmp_path / name), tmp_path / name, how)
    kept = [line for line in err.splitlines() if line.startswith("interrupted: checkpoint ")]
    assert len(kept) == 2 and kept[0] == kept[1], err[-3000:]        # both ranks stopped at one step
    losses = lambda out: [(r["step"], r["loss"]) for r in metrics(out)]
    for name in ("killed", "stopped"):
        assert "resuming from" in finished(torchrun(args(tmp_path / name) + ["--resume"]))
        want, got = adapter(tmp_path / "ref" / "adapter"), adapter(tmp_path / name / "adapter")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert losses(tmp_path / name) == losses(tmp_path / "ref")

    # The same run resumed by one process: one line, naming the process counts.
    assert train_cli.main(args(tmp_path / "killed") + ["--device", "cpu", "--resume", "--fsdp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume:") and "(world_size: 2 there, 1 now)" in err[0]


def _gathered_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of test_gathered_embedding_and_head: its rows of random weights, the whole results."""
    import torch.distributed as dist
    import torch.nn as nn
    from lora.training.gathered import RowShardedEmbedding, RowShardedHead
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    results = {}
    for V in (7, 2):                                    # rows split 3, 3, 1 and 1, 1, 0
        torch.manual_seed(V)                            # the same whole weights, inputs and grads on every rank
        W, E = torch.randn(V, 13), torch.randn(V, 13)
        h, dY, ids = torch.randn(2, 5, 13, requires_grad=True), torch.randn(2, 5, V), torch.randint(0, V, (2, 5))
        head, emb = RowShardedHead(nn.Linear(13, V, bias=False)), RowShardedEmbedding(nn.Embedding(V, 13))
        with torch.no_grad():
            head.weight.copy_(W[head.first_row:head.first_row + head.weight.shape[0]])
            emb.weight.copy_(E[emb.first_row:emb.first_row + emb.weight.shape[0]])
        logits = head(h)
        logits.backward(dY)
        results[V] = dict(rows=head.weight.shape[0], logits=logits.detach(), dh=h.grad, emb=emb(ids), W=W, E=E,
                          h=h.detach(), dY=dY, ids=ids)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_embedding_and_head_are_the_whole_ones(tmp_path):
    """3 gloo ranks, vocabularies of 7 and 2 rows (a rank holding 1 row, and none): the row-sharded head's
    logits and dh = dlogits W, and the embedding's lookup, equal nn.Linear's autograd and F.embedding on
    the whole weights bit for bit, on every rank."""
    import socket
    import torch.multiprocessing as mp
    import torch.nn.functional as F
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gathered_worker, args=(3, port, str(tmp_path)), nprocs=3)
    for rank in range(3):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert [res[V]["rows"] for V in (7, 2)] == [[3, 3, 1][rank], [1, 1, 0][rank]]
        for V, r in res.items():
            h = r["h"].clone().requires_grad_()
            logits = F.linear(h, r["W"])
            logits.backward(r["dY"])
            assert torch.equal(r["logits"], logits) and torch.equal(r["dh"], h.grad)
            assert torch.equal(r["emb"], F.embedding(r["ids"], r["E"]))


def _group_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of test_the_process_group_is_left: whether the group is held, at each point."""
    import torch.distributed as dist
    from lora.runtime.device import resolve_device
    from lora.training import distributed
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device, seen = resolve_device("cpu", rank), []
    with distributed.process_group(device):
        seen.append(distributed.active())
        distributed.barrier()
    seen.append(distributed.active())
    with pytest.raises(ValueError):
        with distributed.process_group(device):
            seen.append(distributed.all_reduce(torch.ones(1)).item())
            raise ValueError("an error inside")
    seen.append(distributed.active())
    dist.init_process_group("gloo")                     # a caller's own group: used, not left
    with distributed.process_group(device):
        distributed.barrier()
    seen.append(distributed.active())
    dist.destroy_process_group()
    torch.save(seen, f"{out}/rank{rank}.pt")


def test_the_process_group_is_left_at_the_end_and_on_an_error(tmp_path):
    """distributed.process_group joins torchrun's group for its block and leaves it after, an error
    included (gloo's threads, left to the interpreter's exit, may abort a finished run); a group its
    caller joined first stays joined."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_group_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) == [True, False, 2.0, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_rows_reads_only_each_ranks_rows(tiny, dtype):
    """Three ranks' row ranges (torch.chunk's split, as FSDP2's) put back together are the checkpoint's
    tensors, and each rank reads only its rows' bytes: the three reads add up to the file's data once."""
    full = load_file(str(tiny / "base" / "model.safetensors"))
    world, parts, read = 3, {name: [] for name in full}, []
    for rank in range(world):
        wanted = {}
        for name, t in full.items():
            chunk = -(-t.shape[0] // world)
            first = min(rank * chunk, t.shape[0])
            rows = max(0, min(chunk, t.shape[0] - first))
            dest = torch.full((rows, *t.shape[1:]), float("nan"), dtype=dtype)       # poisoned
            wanted[name] = (first, dest)
            parts[name].append(dest)
        read.append(read_rows(tiny / "base", wanted))
    assert all(torch.equal(torch.cat(parts[name]), t.to(dtype)) for name, t in full.items())
    assert sum(read) == base_bytes(tiny / "base")
    assert max(read) <= 0.4 * sum(read)
    with pytest.raises(LoRAError, match="not in its safetensors files, e.g. nope"):
        read_rows(tiny / "base", {"nope": (0, torch.empty(1))})
    name = next(iter(full))
    with pytest.raises(LoRAError, match="do not fit"):
        read_rows(tiny / "base", {name: (full[name].shape[0], torch.empty(1, *full[name].shape[1:]))})


def test_what_fsdp_refuses(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", fsdp=True)
    with pytest.raises(LoRAError, match="--fsdp is not supported on HPU"):
        check_fsdp(cfg, SimpleNamespace(name="hpu"))
    check_fsdp(cfg, SimpleNamespace(name="cpu"))
    tiny_config(tiny, tmp_path / "run", fsdp=True, quantize="nf4")           # a 4-bit base is sharded too
    with pytest.raises(LoRAError, match="needs every quantized weight to be whole blocks of 64 values"):
        ShardedNF4Weight((3, 40), torch.bfloat16, device="meta")


# -- 4-bit bases ------------------------------------------------------------------------------------
NF4_SHARE = re.compile(r"fsdp: rank (\d) of 2 holds ([\d,]+) of the base's ([\d,]+) bytes \(read ([\d,]+) bytes "
                       r"of its safetensors files, NF4 packed ([\d,]+) of ([\d,]+) bytes\)")


def chunks(n: int, world: int) -> list[tuple[int, int]]:
    """Each rank's [first, last) of n, torch.chunk's split (FSDP2's)."""
    c = -(-n // world)
    return [(min(r * c, n), min((r + 1) * c, n)) for r in range(world)]


@pytest.mark.parametrize("shape", [(67, 192), (48, 32), (5, 64)])
def test_a_ranks_blocks_quantized_alone_are_the_whole_tensors(shape):
    """Blockwise NF4 on whole blocks: each rank's run of blocks quantized alone gives the whole tensor's
    packed bytes and absmax for them, and the scales computed from every rank's absmax are the double
    quantization's (NF4Weight.scales()), so the ShardedNF4Weight they fill dequantizes bit for bit as
    the unsharded NF4Weight. in_features 32: a block spans two rows; 5 rows: a rank has none."""
    torch.manual_seed(1)
    W = torch.randn(shape, dtype=torch.float64).mul_(torch.rand(shape[0], 1, dtype=torch.float64) * 3).bfloat16()
    whole = quantize_nf4(W)
    flat, n_blocks = W.reshape(-1), W.numel() // 64
    parts = [quantize_nf4(flat[a * 64:b * 64], double_quant=False) for a, b in chunks(n_blocks, 3)]
    packed = torch.cat([p.packed.view(-1) for p in parts])
    absmax = torch.cat([p.absmax for p in parts])
    assert torch.equal(packed, whole.packed.view(-1))
    sharded = ShardedNF4Weight(W.shape, W.dtype, device="meta").to_empty(device="cpu")
    sharded.reset_quant_map()
    sharded.packed.copy_(packed.view(n_blocks, 32))
    sharded.absmax.copy_(double_quantized_scales(absmax))
    assert torch.equal(sharded.absmax, whole.scales())
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(sharded.dequantize(dtype), whole.dequantize(dtype))
    assert sharded.to(torch.bfloat16).absmax.dtype == torch.float32             # a cast moves, never converts
    assert {n for n, p in sharded.named_parameters() if not p.requires_grad} == {"packed", "absmax"}


def test_read_nf4_blocks_of_a_bitsandbytes_checkpoint(bnb_dir):
    """Three ranks' runs of blocks of every 4-bit weight bitsandbytes wrote: their packed bytes and
    scales put back together are the whole NF4Weight's (read as load_model reads it), and each rank
    reads only its blocks' bytes, codes and the nested scales that cover them."""
    from lora.storage.quantized import QUANT_STATE, quant_state
    want = {f"{name}.weight": m.weight for name, m in load_model(bnb_dir).named_modules()
            if isinstance(m, NF4Linear)}
    entries = {e.name: e for s in read_checkpoint(bnb_dir)[0] for e in s.entries}
    read, expected = [0, 0, 0], [0, 0, 0]
    for name, weight in want.items():
        state = quant_state(load_file(str(next(bnb_dir.glob("*.safetensors"))))[f"{name}.{QUANT_STATE}nf4"], name)
        n_blocks = weight.numel() // 64
        packed, scales = [], []
        for rank, (a, b) in enumerate(chunks(n_blocks, 3)):
            packed.append(torch.full((b - a, 32), 7, dtype=torch.uint8))
            scales.append(torch.full((b - a,), float("nan")))
            read[rank] += read_nf4_blocks(bnb_dir, name, a, packed[-1], scales[-1], state)
            # its packed bytes and scale codes, the nested float32 scales of blocks a … b, the 256-entry map
            expected[rank] += (b - a) * 33 + 4 * (-(-b // 256) - a // 256) + 4 * 256
        assert torch.equal(torch.cat(packed).view(-1), weight.packed.view(-1))
        assert torch.equal(torch.cat(scales), weight.scales())
    assert read == expected
    packed_bytes = sum(entries[name].nbytes for name in want)
    assert max(read) < 0.4 * packed_bytes + 1100 * len(want)


def nf4_args(base, tiny, out, *extra):
    return ["--model", base, "--data", tiny / "train.jsonl", "--out", out, "--max-seq-len", 12, "--lr", 1e-2,
            "--no-progress", "--max-steps", 3, "--log-every", 1, *extra]


def test_fsdp_quantize_nf4_matches_one_process(base, tiny, tmp_path):
    """--fsdp --quantize nf4, 2 processes × batch 4, against one process × batch 8 without --fsdp: the
    same 4-bit weights (tested above), so losses to rel 1e-5 and the adapter to 1e-4 of each tensor's
    largest entry (fp32: the batch is summed in another order). Each rank holds half of the packed
    bytes, its shard about half of the base, and reads its own rows and blocks: the two reads add up
    to the checkpoint's data once."""
    out2 = tmp_path / "fsdp"
    err = finished(torchrun(nf4_args(base, tiny, out2, "--batch-size", 4, "--quantize", "nf4", "--grad-checkpointing")))
    one = train_cli.main([*map(str, nf4_args(base, tiny, tmp_path / "one", "--batch-size", 8, "--quantize", "nf4")),
                          "--device", "cpu"])
    assert one == 0
    assert [r["loss"] for r in metrics(out2)] == pytest.approx([r["loss"] for r in metrics(tmp_path / "one")],
                                                                rel=1e-5)
    ta, tb = adapter(out2 / "adapter"), adapter(tmp_path / "one" / "adapter")
    assert close(ta, tb, 1e-4) and any(tb[k].abs().sum() > 0 for k in tb if "lora_B" in k)
    shares = {int(m[1]): [int(g.replace(",", "")) for g in m.groups()[1:]] for m in NF4_SHARE.finditer(err)}
    assert sorted(shares) == [0, 1]
    assert all(packed == whole_packed // 2 and 0.45 * whole <= held <= 0.55 * whole
               for held, whole, _, packed, whole_packed in shares.values())
    assert sum(read for _, _, read, _, _ in shares.values()) == base_bytes(base)


def test_fsdp_quantize_nf4_resume_after_sigkill_is_bit_identical(base, tiny, tmp_path):
    """--fsdp --quantize nf4: SIGKILL to torchrun and both workers after the first checkpoint, then
    --resume (each rank quantizing its blocks again): the adapter and every step's loss of an
    uninterrupted run, bit for bit."""
    args = lambda out: nf4_args(base, tiny, out, "--quantize", "nf4", "--batch-size", 4, "--max-steps", 40,
                                "--save-every", 4, "--lora-dropout", 0.1)
    finished(torchrun(args(tmp_path / "ref")))
    interrupt(args(tmp_path / "killed"), tmp_path / "killed", kill_with_workers)
    assert "resuming from" in finished(torchrun(args(tmp_path / "killed") + ["--resume"]))
    want, got = adapter(tmp_path / "ref" / "adapter"), adapter(tmp_path / "killed" / "adapter")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    losses = lambda out: [(r["step"], r["loss"]) for r in metrics(out)]
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 40


def test_fsdp_over_a_bitsandbytes_checkpoint_is_data_parallel_bit_for_bit(bnb_dir, tiny, tmp_path):
    """A transformers + bitsandbytes 4-bit checkpoint under --fsdp (bf16, activation checkpointing,
    dropout): the adapter and losses of the same run without --fsdp, bit for bit. Each rank reads its
    blocks' bytes, not the whole checkpoint."""
    args = lambda out: nf4_args(bnb_dir, tiny, out, "--batch-size", 4, "--dtype", "bf16", "--grad-checkpointing",
                                "--lora-dropout", 0.1)
    err = finished(torchrun(args(tmp_path / "fsdp")))
    finished(torchrun(args(tmp_path / "ddp"), fsdp=False))
    want, got = adapter(tmp_path / "ddp" / "adapter"), adapter(tmp_path / "fsdp" / "adapter")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in metrics(tmp_path / "fsdp")] == [r["loss"] for r in metrics(tmp_path / "ddp")]
    shares = {int(m[1]): [int(g.replace(",", "")) for g in m.groups()[1:]] for m in NF4_SHARE.finditer(err)}
    assert sorted(shares) == [0, 1]
    assert all(packed == whole_packed // 2 and read < 0.6 * base_bytes(bnb_dir)
               for _, _, read, packed, whole_packed in shares.values())
