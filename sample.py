"""
Caption images (or chat without one) with a trained stage-2 model.

    python sample.py --image cat.jpg                       # the latest stage-2 output under out/
    python sample.py --image a.jpg --image b.png --temperature 0.7 --top_p 0.9
    python sample.py --prompt "What is the capital of France?"   # no image: text-only chat

With --temperature 0 (greedy) each image's caption goes to stdout on one line, everything else to stderr.
"""
import argparse
import glob
import os
import sys

import torch
from PIL import Image, UnidentifiedImageError

from data import to_pixels


def latest_checkpoint(root="out"):
    found = [os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "config.json"))
             if os.path.isdir(os.path.join(os.path.dirname(p), "adapter"))]
    return max(found, key=os.path.getmtime) if found else None


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", action="append", default=[], help="image file (repeat for a batch)")
    p.add_argument("--checkpoint", default=None, help="a train_vlm.py output folder (default: the latest in out/)")
    p.add_argument("--prompt", default=None, help="the user's question (default: a captioning prompt)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the LM's dtype: auto = the machine's fastest for decoding (measured once per machine)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: 20-30 s to compile on a 2-core CPU the first time (seconds "
                   "once cached), then several times the tokens/s (for long replies)")
    a = p.parse_args(argv)

    images = []
    for path in a.image:  # check every input before loading a model
        if not os.path.isfile(path):
            fail(f"no such file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            fail(f"{path} is not a readable image ({e.__class__.__name__})")

    ckpt = a.checkpoint or latest_checkpoint()
    if ckpt is None or not os.path.exists(os.path.join(ckpt, "config.json")):
        fail(f"no stage-2 checkpoint {'at ' + ckpt if ckpt else 'under out/'}: train one with train_vlm.py "
             "(or the demo), or pass --checkpoint")
    from load_weights import WeightLoadError
    from train_vlm import USER_PROMPTS, load_vlm
    from trainer import CheckpointError
    print(f"loading {ckpt} ...", file=sys.stderr)
    try:
        model, meta = load_vlm(ckpt, a.device)
    except (FileNotFoundError, ConnectionError, CheckpointError, WeightLoadError) as e:
        fail(str(e))
    from trainer import decoding_dtypes
    dev = torch.device(a.device)
    model.for_decoding(*decoding_dtypes(dev, a.dtype, compiled=a.compile))
    if a.compile:
        model.llm.compile_decode()
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              generator=gen, fast=a.compile)  # static shapes: what compiles; eager, the growing cache is faster
    stream = len(images) <= 1  # one row: print the text as it comes (a caption stays one line on stdout)
    if stream:
        ids, shown = [], ""

        def show(token):
            nonlocal shown
            if token.item() == 2:
                return
            ids.append(token.item())
            text = model.tok.decode(ids)  # the whole reply so far: a character may span several byte tokens
            if "\ufffd" in text[-1:]:
                return  # a character cut in half: wait for its other bytes
            new = text[len(shown):]
            print(new.replace("\n", " ") if images else new, end="", flush=True)
            shown = text
        kw["on_token"] = show
    if images:
        pix = torch.stack([to_pixels(im, meta["image_size"]) for im in images])
        out = model.generate(pix, [a.prompt or USER_PROMPTS[0]] * len(images), **kw)
        for path, text in zip(a.image, out):
            if not stream:
                print(text.replace("\n", " "), flush=True)
    else:
        out = model.generate(prompts=[a.prompt or "Hello! What can you do?"], **kw)
        if not stream:
            print(out[0])
    if stream:
        print()


if __name__ == "__main__":
    main()
