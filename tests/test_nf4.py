"""NF4 (lora/quant/nf4.py): the code, the nibble order and the scale layout on hand-made blocks, and
bit-identity with bitsandbytes' quantize_4bit / dequantize_4bit on fresh random tensors."""
import pytest
import torch

from lora import LoRAError, NF4Weight, quantize_nf4
from lora.quant.nf4 import NF4_CODE, dynamic_map

CODE = torch.tensor(NF4_CODE, dtype=torch.float32)


def test_hand_made_block_codes_nibbles_and_scale():
    # One block of 64: the 16 code values times 3, four times over; absmax = 3.
    w = (CODE * 3.0).repeat(4)                                               # (64,)
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.shape == (32, 1) and q.packed.dtype == torch.uint8
    assert q.absmax.tolist() == [3.0]
    expected = [(2 * i) << 4 | (2 * i + 1) for i in range(8)] * 4         # even element in the HIGH nibble
    assert q.packed.view(-1).tolist() == expected
    assert torch.equal(q.dequantize(), w)


def test_nearest_code_ties_and_ragged_tail():
    # Block 1 (64): exact midpoints between codes 7 and 8 go down; just above goes up; block 2 is the
    # ragged tail of 3 elements, scaled by its own absmax; the odd element count pads a zero nibble (code 7).
    mid = (CODE[7] + CODE[8]) / 2
    block = torch.zeros(64)
    block[0], block[1], block[2] = 1.0, mid, torch.nextafter(mid, torch.tensor(1.0))
    tail = torch.tensor([-2.0, 1.0, 0.0])
    q = quantize_nf4(torch.cat([block, tail]), double_quant=False)
    codes = q.codes().tolist()
    assert codes[:3] == [15, 7, 8] and codes[64:] == [0, 12, 7]        # 0.5 is nearer 0.4407 than 0.5626
    assert q.absmax.tolist() == [1.0, 2.0]
    assert q.packed.view(-1)[-1].item() == (7 << 4 | 7)                 # element 66 (code 7) and the pad (7)


def test_double_quant_layout():
    torch.manual_seed(0)
    w = torch.randn(300, 64 * 3) * 0.02                                   # 900 blocks → 4 nested blocks (ragged)
    q = quantize_nf4(w)
    assert q.absmax.dtype == torch.uint8 and q.absmax.shape == (900,)
    assert q.nested_absmax.shape == (4,) and q.nested_quant_map.shape == (256,)
    plain = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, plain.packed)                            # codes do not depend on the scales' storage
    # the dynamic map's widest step is 0.9/64 near ±1: half of it, relative to each nested absmax
    step = q.nested_absmax.repeat_interleave(256)[:900] * (0.9 / 64 / 2)
    assert ((q.scales() - plain.absmax).abs() <= step * 1.0001).all()
    assert abs(q.offset.item() - plain.absmax.mean().item()) < 1e-9
    # ≈ 4.127 bits per parameter at a real size, tables included
    big = quantize_nf4(torch.randn(1024, 4096))
    assert 4.12 < big.nbytes * 8 / big.numel() < 4.13


def test_dequantize_against_float64_and_device_moves_only():
    torch.manual_seed(1)
    w = torch.randn(37, 91, dtype=torch.bfloat16)
    q = quantize_nf4(w)
    ref = (CODE.double()[q.codes()].view(-1) * q.scales().double().repeat_interleave(64)[:w.numel()])
    assert torch.equal(q.dequantize(torch.float32), ref.float().view(37, 91))
    assert q.dequantize().dtype == torch.bfloat16
    q.to(torch.float16)                                                   # a dtype cast leaves the format alone
    assert q.nested_absmax.dtype == torch.float32 and q.packed.dtype == torch.uint8


def test_bad_input_is_one_line():
    with pytest.raises(LoRAError, match="float32, bfloat16 or float16"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(LoRAError, match="block size"):
        quantize_nf4(torch.ones(4), block_size=48)


# -- bitsandbytes ----------------------------------------------------------------------------------

def _bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (pip install -e .[test])")


def test_dynamic_map_is_bitsandbytes():
    F = _bnb()
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(333, 777), (29, 45), (7, 9), (1,), (5, 64 * 260 + 3), (128, 256), (1100, 1000)])
def test_bit_identical_to_bitsandbytes(shape, dtype):
    """(1100, 1000): more than one quantization chunk of lora/quant/nf4.py, and a ragged last block."""
    F = _bnb()
    w = (torch.randn(shape) * torch.rand(()) * 0.1).to(dtype)            # fresh each run
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w)
    assert isinstance(q, NF4Weight)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.equal(q.nested_quant_map, state.state2.code)
    assert torch.equal(q.quant_map, state.code)
    assert torch.equal(q.offset, state.offset)
    # bitsandbytes' AVX-512 CPU dequantizer (0.50) indexes the scales per row, wrong when the last
    # dimension is a multiple of 16 but not of 64; no shape here is such a one.
    assert torch.equal(q.dequantize(), F.dequantize_4bit(packed, state))
