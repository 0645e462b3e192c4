import sys, torch, random
import pandas as pd
from tip_verl.assets import build_assets
from tip_verl.verl_adapter.local_workers import build_local_workers
from tip_verl import topk_divergences
torch.set_num_threads(1)
lr = sys.argv[1]; loss = sys.argv[2]
a = build_assets(quiet=True)
df = pd.read_parquet(a.train_parquet)
P = [list(p) for p in df["prompt"]]
w = build_local_workers(str(a.student), ref_model_path=str(a.teacher), tip_loss=loss,
                        overrides=[f"actor_rollout_ref.actor.optim.lr={lr}"])
K = 347
b = w.make_batch(P[:64], max_new_tokens=8, temperature=1.0, seed=1)
m = b["response_mask"].bool()
t_s, t_lp, t_ids = w.ref_log_probs(b, topk=K)
for it in range(6):
    s = w.log_probs(b, entropy=True, gather_topk_ids=t_ids)
    rkl, _ = topk_divergences(t_lp, t_ids, s["topk_log_probs"], m)
    k1 = (s["log_probs"] - t_s)[m].mean()
    print(it, "exact rKL", float(rkl[m].mean()), "k1 on batch", float(k1), flush=True)
    adv = torch.where(m, -(s["log_probs"] - t_s), torch.zeros_like(t_s))
    met = w.update(b, adv, old_log_probs=s["log_probs"], teacher_topk=(t_lp, t_ids) if loss != "pg" else None)
