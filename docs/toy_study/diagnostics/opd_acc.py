import sys, torch, random
import pandas as pd
from tip_verl.assets import build_assets
from tip_verl.assets.reward import compute_score
from tip_verl.verl_adapter.local_workers import build_local_workers
from tip_verl.verl_adapter.opd import opd_step
from tip_verl.verl_adapter.opd_config import TIPRunConfig
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
student, lr, steps, method, ratio = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
a = build_assets(quiet=True)
tr = pd.read_parquet(a.train_parquet); te = pd.read_parquet(a.test_parquet)
P = [list(p) for p in tr["prompt"]]
TP = [list(p) for p in te["prompt"]]; TG = [r["ground_truth"] for r in te["reward_model"]]
DIRECT = len(sys.argv) > 7 and sys.argv[7] == "direct"
w = build_local_workers(student, ref_model_path=str(a.teacher), tip_loss="topk_reverse_kl" if DIRECT else "pg", overrides=[f"actor_rollout_ref.actor.optim.lr={lr}"])
tip = {"teacher_path": str(a.teacher), "method": method, "selection_scope": "batch"}
if method != "all": tip["ratio"] = ratio
run = TIPRunConfig.from_mapping(tip)
def acc(n=4):
    tot = 0.0
    for r in range(n):
        b = w.make_batch(TP, max_new_tokens=8, temperature=1.0, seed=1000 + r, sync_weights=True)
        for i in range(len(TP)):
            L = int(b["response_mask"][i].sum())
            text = w.tokenizer.decode(b["responses"][i][:L].tolist())
            tot += compute_score("tip_tiny_addition", text, TG[i])
    return tot / (n * len(TP))
print("acc before", acc(), flush=True)
rng = random.Random(0)
for step in range(steps):
    ps = [P[rng.randrange(len(P))] for _ in range(16)] * 4
    b = w.make_batch(ps, max_new_tokens=8, temperature=1.0, seed=step, sync_weights=True)
    m = b["response_mask"].bool()
    if DIRECT:
        t, tl, ti = w.ref_log_probs(b, topk=347)
        s = w.log_probs(b, entropy=True, gather_topk_ids=ti)
        st = opd_step(run, student_logprobs=s["log_probs"], teacher_logprobs=t, entropy_nats=s["entropy"], response_mask=m, vocab_size=347,
                      teacher_topk_logprobs=tl, teacher_topk_ids=ti, student_topk_logprobs=s["topk_log_probs"])
    else:
        s = w.log_probs(b, entropy=True); t = w.ref_log_probs(b)
        st = opd_step(run, student_logprobs=s["log_probs"], teacher_logprobs=t, entropy_nats=s["entropy"], response_mask=m, vocab_size=347)
    bb = b.clone(); bb["response_mask"] = st.keep_mask.long()
    met = w.update(bb, st.advantages, old_log_probs=s["log_probs"], teacher_topk=(tl, ti) if DIRECT else None)
    if step < 3 or step % 20 == 0: print("lr", met.get("actor/lr", met.get("lr")), "gn", met.get("actor/grad_norm", met.get("grad_norm")), sorted(met)[:8], flush=True)
    if step % 50 == 49: print(step, "train KL", st.metrics["tip/reverse_kl_mean"], st.metrics.get("tip/topk_reverse_kl_mean"), "acc", acc(2), flush=True)
print("acc after", acc(), flush=True)
