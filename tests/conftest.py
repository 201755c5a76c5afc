import os

import pytest
import torch

# Triton decides between its CPU interpreter and its compiler when a kernel is decorated, i.e. at
# import, and transformers may import our kernels (as the top-level name `kernels`) long before the
# kernel tests run. Without a GPU the kernels can only run interpreted: set it before anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama_config(**kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=84, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture
def tiny_llama():
    """A fresh random 3-layer Llama with grouped-query attention (k/v narrower than q)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 11), generator=g)
