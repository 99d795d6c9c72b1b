"""
The offline demo, end to end on 2 CPU cores: stage 1 (Q-Former on built-in shapes data, MiniLM BERT), stage 2
(SmolLM2-135M-Instruct from the pip-installed GGUF, MLP + LoRA), then captions of held-out images next to their
ground truth and the held-out attribute accuracy.

    python demo.py                  # everything, ~15 minutes on 2 CPU cores
    python demo.py --out_dir out    # where the two stages write (out/shapes-qformer, out/shapes-vlm)
"""
import argparse
import os
import time

import train_qformer
import train_vlm
from trainer import run_cli


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out")
    a = p.parse_args()
    s1, s2 = os.path.join(a.out_dir, "shapes-qformer"), os.path.join(a.out_dir, "shapes-vlm")
    t0 = time.time()
    print("== stage 1: Q-Former (ITC) on shapes ==", flush=True)
    m1 = train_qformer.main(["--preset", "shapes", "--out_dir", s1])
    t1 = time.time()
    print(f"\n== stage 2: MLP + LoRA on SmolLM2 ({(t1 - t0) / 60:.1f} min so far) ==", flush=True)
    m2 = train_vlm.main(["--preset", "shapes", "--qformer", s1, "--out_dir", s2])
    t2 = time.time()
    print(f"\n== summary ({(t2 - t0) / 60:.1f} min: stage 1 {(t1 - t0) / 60:.1f}, stage 2 {(t2 - t1) / 60:.1f}) ==")
    print("stage 1 held-out retrieval: " + ", ".join(f"{k} {m1[k]:.3f}" for k in
                                                     ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "chance_r5")))
    print("stage 2 held-out attribute accuracy: " + ", ".join(
        f"{k[5:]} {m2[k]:.1%}" for k in ("attr_colour", "attr_shape", "attr_count", "attr_relation", "attr_mean",
                                         "attr_exact")))
    print(f"BLEU-4 {m2['bleu4']:.3f}  CIDEr-D {m2['cider_d']:.3f}")
    print(f"\ntry it: python sample.py --checkpoint {s2} --image <some.png>")


if __name__ == "__main__":
    run_cli(main, ImportError)
