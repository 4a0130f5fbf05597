"""
A lab tool (dev/model.md, "CPU preset"), not part of the model: one training step of the CPU preset's model
(config/train_cpu.py; forward and backward of the preset's batches, no optimizer step) timed on the CPU. It runs four
fixed batches per repeat and prints the median ms a step and the last batch's LM loss (to compare two versions of
the code to the digit):
    python dev/cpu_step.py [repeats]          # 5 repeats by default
"""
import os
import statistics
import sys
import time
from dataclasses import fields

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data
from configurator import read_config_file
from model import GPT, GPTConfig


def main():
    conf = read_config_file("config/train_cpu.py")
    kw = {f.name: conf[f.name] for f in fields(GPTConfig) if f.name in conf}
    kw.update(vocab_size=data.VOCAB_SIZE, patch_dim=data.PATCH_DIM, img_patch_id=data.IMG_PATCH)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kw))
    rng = np.random.default_rng(0)
    batches = [data.get_batch("train", conf["batch_size"], conf["seq_len"], rng, p_image=conf["p_image"])
               for _ in range(4)]

    def step(x, y, patches):
        _, parts = model(x, y, patches=patches)
        (parts["lm"] + parts["kl"] + 0.01 * parts["balance"]).backward()
        model.zero_grad(set_to_none=True)
        return parts["lm"].item()

    for b in batches:                                                          # warm-up
        step(*b)
    times = []
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        t = time.perf_counter()
        for b in batches:
            lm = step(*b)
        times.append((time.perf_counter() - t) / len(batches) * 1e3)
    print(f"ms a step: median {statistics.median(times):.0f} (each repeat: {', '.join(f'{t:.0f}' for t in times)}); "
          f"LM loss of the last batch {lm:.6f}")


if __name__ == "__main__":
    main()
