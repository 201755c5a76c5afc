import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688,
                                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2))
base_state = {k: v.clone() for k, v in model.state_dict().items()}
ids = torch.randint(0, 1000, (2, 16))
base_logits = model(ids).logits

lora.apply_lora(model, lora.LoRAConfig(r=16, lora_alpha=32))      # all seven projections
print(lora.trainable_parameters(model))
print("B = 0, so the output is the base's, bit for bit:", torch.equal(model(ids).logits, base_logits))

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for step in range(3):
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

lora.save_adapter(model, "runs/example-adapter")                  # PEFT's format
logits = model.eval()(ids).logits

fresh = LlamaForCausalLM(model.config)
fresh.load_state_dict(base_state)
lora.load_adapter(fresh, "runs/example-adapter")                   # applies LoRA from the saved config
print("reloaded adapter, same logits:", torch.equal(fresh.eval()(ids).logits, logits))
with lora.disable_adapter(fresh):
    print("adapter disabled = base:", torch.equal(fresh(ids).logits, base_logits))
lora.merge_lora(fresh)                                             # plain nn.Linear modules again
print("merged, max |logit diff|:", (fresh(ids).logits - logits).abs().max().item())
