import sys, shutil, torch
from pathlib import Path
from transformers import AutoTokenizer
from tip_verl.assets import build_assets, DEFAULT_BUILD_CONFIG
from tip_verl.assets import models as M
from tip_verl.assets.task import split_pairs, training_stream
torch.set_num_threads(2)
steps = int(sys.argv[1]); out = Path(sys.argv[2])
a = build_assets(quiet=True)
tok = AutoTokenizer.from_pretrained(a.student)
cfg = DEFAULT_BUILD_CONFIG
model = M.build_model(cfg.teacher, tok, 7)
test = split_pairs(cfg.task, 0)["test"]
print(M.train(model, tok, training_stream(cfg.task, 0, set(test), "student_big"), M.TrainConfig(steps=steps, batch_size=64, lr=3e-3), 7))
print("greedy", M.accuracy(model, tok, test, do_sample=False), "sampled", M.accuracy(model, tok, test, do_sample=True))
if out.exists(): shutil.rmtree(out)
shutil.copytree(a.student, out)
model.save_pretrained(out)
