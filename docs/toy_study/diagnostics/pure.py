import sys, torch, random
import pandas as pd
from transformers import AutoModelForCausalLM, AutoTokenizer
from tip_verl.assets import build_assets
torch.set_num_threads(1); torch.manual_seed(0)
lr = float(sys.argv[1]); steps = int(sys.argv[2]); student = sys.argv[3]
a = build_assets(quiet=True)
tok = AutoTokenizer.from_pretrained(a.student)
S = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
T = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
tr = pd.read_parquet(a.train_parquet)
P = [tok.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True) for p in tr["prompt"]]
P = [p["input_ids"] if hasattr(p, "keys") else p for p in P]
opt = torch.optim.AdamW(S.parameters(), lr=lr, weight_decay=0.01)
rng = random.Random(0)
eos = tok.convert_tokens_to_ids("<|im_end|>")
def batch(n):
    ps = [P[rng.randrange(len(P))] for _ in range(n)]
    L = max(len(p) for p in ps)
    ids = torch.tensor([[tok.pad_token_id or 0] * (L - len(p)) + p for p in ps]); att = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in ps])[:, None]).long()
    with torch.no_grad():
        out = S.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)
    resp = out[:, L:]
    rm = torch.ones_like(resp)
    for i in range(resp.shape[0]):
        e = (resp[i] == eos).nonzero()
        if len(e): rm[i, e[0, 0] + 1:] = 0
    full_att = torch.cat([att, rm], 1)
    return out, full_att, L, rm.bool()
for step in range(steps):
    out, att, L, rm = batch(64)
    pos = (att.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        tl = torch.log_softmax(T(input_ids=out, attention_mask=att, position_ids=pos).logits[:, L - 1:-1].float(), -1)
    sl = torch.log_softmax(S(input_ids=out, attention_mask=att, position_ids=pos).logits[:, L - 1:-1].float(), -1)
    kl = (sl.exp() * (sl - tl)).sum(-1)
    loss = kl[rm].mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(S.parameters(), 1.0); opt.step()
    if step % 25 == 0 or step == steps - 1: print(step, "exact rKL", float(loss), flush=True)
