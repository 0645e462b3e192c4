import sys, shutil, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from tip_verl.assets import build_assets, DEFAULT_BUILD_CONFIG
from tip_verl.assets import models as M
from tip_verl.assets.task import split_pairs, training_stream
torch.set_num_threads(2)
extra = int(sys.argv[1]); lr = float(sys.argv[2]); out = Path(sys.argv[3])
a = build_assets(quiet=True)
tok = AutoTokenizer.from_pretrained(a.student)
model = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
cfg = DEFAULT_BUILD_CONFIG
pairs = split_pairs(cfg.task, 0)
test = pairs["test"]
tcfg = M.TrainConfig(steps=extra, batch_size=64, lr=lr)
print(M.train(model, tok, training_stream(cfg.task, 0, set(test), "student_more"), tcfg, 1))
print("greedy", M.accuracy(model, tok, test, do_sample=False), "sampled", M.accuracy(model, tok, test, do_sample=True))
if out.exists(): shutil.rmtree(out)
shutil.copytree(a.student, out)
model.save_pretrained(out)
