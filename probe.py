"""
Probes: what a stage-1 checkpoint's image features say about a shapes scene, before stage 2 is paid for.
A logistic regression per attribute, fitted on the features of training images and scored on held-out ones:
the object count; colour, shape, size and region of single objects; the relation between two objects. The
features are the Q-Former's query outputs, all of them concatenated (what stage 2's projector reads), or with
--features vit the ViT's patch tokens (what the Q-Former reads). Chance = the held-out share of the commonest class.
A relation between two objects is not linear in the tokens (find each object, then compare where they are), so
--attention also fits a small attention probe per attribute: a few learned queries attend over the tokens, then
an MLP; it reads what a reader of the tokens (stage 2's LM) could learn to, not only what is linearly there.
An attribute the probes cannot read is one stage 2 will hardly learn to name (EXPERIMENTS.md). Given a stage-2
folder, it also captions the first --n_captions held-out images and scores what the captions say against the same
labels: where a probe reads an attribute and the captions do not, the LM has not learned to read it yet.

    python probe.py --qformer out/shapes-qformer
    python probe.py --qformer out/shapes-qformer --features vit
    python probe.py --qformer out/shapes-qformer --attention --n_train 12000   # ~4k two-object images
    python probe.py --qformer out/shapes-vlm                      # after stage 2, and what its captions say
"""
import argparse
import json
import os
from collections import Counter

import torch
import torch.nn.functional as F

import data
import metrics
from load_weights import load_vit
from train_qformer import build_stage1, load_stage1
from trainer import run_cli

one, two = (lambda objs: len(objs) == 1), (lambda objs: len(objs) == 2)
PROBES = {  # name: (which scenes take part, the label); objects are (size, colour, shape, x, y)
    "count": (lambda objs: True, len),
    "colour (1 object)": (one, lambda objs: objs[0][1]),
    "shape (1 object)": (one, lambda objs: objs[0][2]),
    "size (1 object)": (one, lambda objs: objs[0][0]),
    "region (1 object)": (one, lambda objs: data.region(objs[0])),
    "relation (2 objects)": (two, lambda objs: data.relation(*sorted(objs, key=data.object_name))),
}


def caption_says(caption, objs):
    """{probe: does the caption get it right} for the probes that apply to this scene. Single-object attributes
    are read from the first object the caption names; a relation counts only when both objects are named."""
    c = caption.lower()
    named = metrics.MENTION.findall(c)  # (size, colour, shape) per object named
    out = {"count": len(named) == len(objs)}
    if len(objs) == 1:
        size, colour, shape = named[0] if named else (None, None, None)
        out.update({"colour (1 object)": colour == objs[0][1], "shape (1 object)": shape == objs[0][2],
                    "size (1 object)": size == objs[0][0], "region (1 object)": data.region(objs[0]) in c})
    if len(objs) == 2:
        out["relation (2 objects)"] = metrics.judge(caption, {"objects": objs})["relation"]
    return out


@torch.no_grad()
def caption_accuracy(model, image_size, n, batch=50):
    """{probe: (n images, share a stage-2 model's greedy captions get right)} on the first n held-out images."""
    ds, right = data.ShapesDataset("val", image_size=image_size), {}
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        caps = model.generate(torch.stack([ds[i][0] for i in idx]), max_new_tokens=48)
        for i, c in zip(idx, caps):
            for name, ok in caption_says(c, data.shape_scene(ds.seed, i)["objects"]).items():
                right.setdefault(name, []).append(ok)
    return {name: (len(v), sum(v) / len(v)) for name, v in right.items()}


@torch.no_grad()
def features(vit, qformer, split, n, image_size, which="qformer", batch=100):
    """-> ([n, tokens, dim] features of the first n images of a shapes split, their scenes' objects)."""
    ds, feats, scenes = data.ShapesDataset(split, image_size=image_size), [], []
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        h = vit(torch.stack([ds[i][0] for i in idx]))
        feats.append(h[:, 1:] if which == "vit" else qformer.encode_image(h))
        scenes += [data.shape_scene(ds.seed, i)["objects"] for i in idx]
    return torch.cat(feats), scenes


def fit_probe(x, y, n_classes, l2=1e-3, max_iter=100):
    """Multinomial logistic regression on standardised features, by L-BFGS. -> predict(x) -> class ids."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(x.size(1), n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()  # L2: far more dimensions than images
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda x_new: (((x_new - mu) / sd) @ w + b).argmax(1)


class AttentionProbe(torch.nn.Module):
    """Learned queries attend over the (standardised) tokens with learned positions, then an MLP on their outputs:
    enough to find two objects and compare them, which a linear read-out of the flattened tokens cannot."""

    def __init__(self, n_tokens, dim, n_classes, width=128, n_queries=4, n_heads=4):
        super().__init__()
        self.inp = torch.nn.Linear(dim, width)
        # positions at the scale of the projected (standardised) tokens, not near zero: where a token lies is half
        # of a relation, and a probe whose positions start near 0.02 needs several times the epochs to find it
        self.pos = torch.nn.Parameter(torch.randn(n_tokens, width))
        self.queries = torch.nn.Parameter(torch.randn(n_queries, width) * 0.02)
        self.attn = torch.nn.MultiheadAttention(width, n_heads, batch_first=True)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(n_queries * width),
                                        torch.nn.Linear(n_queries * width, width), torch.nn.GELU(),
                                        torch.nn.Linear(width, n_classes))

    def forward(self, x):
        h = self.inp(x) + self.pos
        out, _ = self.attn(self.queries.expand(x.size(0), -1, -1), h, h, need_weights=False)
        return self.head(out.flatten(1))


def fit_attention_probe(x, y, n_classes, epochs=40, batch=128, lr=1e-3, seed=0):
    """x: [n, tokens, dim]. AdamW with weight decay, a cosine schedule. -> predict(x) -> class ids."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = x.mean((0, 1)), x.std((0, 1)) + 1e-6
    z = (x - mu) / sd
    net = AttentionProbe(x.size(1), x.size(2), n_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(z) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(z), generator=g).split(batch):
                loss = F.cross_entropy(net(z[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    return lambda x_new: net((x_new - mu) / sd).argmax(1)


def run_probes(x_train, train_scenes, x_eval, eval_scenes, attention=False):
    """x: [n, tokens, dim] (or [n, dim]). -> {probe: (n_train, held-out accuracy, chance[, attention probe's])}"""
    out = {}
    for name, (keep, label) in PROBES.items():
        tr = [i for i, s in enumerate(train_scenes) if keep(s)]
        ev = [i for i, s in enumerate(eval_scenes) if keep(s)]
        classes = sorted({label(train_scenes[i]) for i in tr}, key=str)
        cid = {c: k for k, c in enumerate(classes)}
        y_tr = torch.tensor([cid[label(train_scenes[i])] for i in tr])
        y_ev = torch.tensor([cid.get(label(eval_scenes[i]), -1) for i in ev])  # a class never seen is a miss
        predict = fit_probe(x_train[tr].flatten(1), y_tr, len(classes))
        chance = Counter(y_ev.tolist()).most_common(1)[0][1] / len(ev)
        out[name] = (len(tr), (predict(x_eval[ev].flatten(1)) == y_ev).float().mean().item(), chance)
        if attention:
            predict = fit_attention_probe(x_train[tr], y_tr, len(classes))
            out[name] += ((predict(x_eval[ev]) == y_ev).float().mean().item(),)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qformer", default="out/shapes-qformer",
                   help="a stage-1 output folder (shapes data), a stage-2 one (the Q-Former as stage 2 left it), or "
                        "a ViT folder (its patch tokens)")
    p.add_argument("--features", choices=("qformer", "vit"), default="qformer")
    p.add_argument("--attention", action="store_true",
                   help="also fit an attention probe per attribute (a minute or so per 10k images)")
    p.add_argument("--n_train", type=int, default=3000)
    p.add_argument("--n_eval", type=int, default=1000)
    p.add_argument("--n_captions", type=int, default=300,
                   help="with a stage-2 folder: held-out images to caption and score the same way (0: none)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    meta = json.load(open(os.path.join(a.qformer, "config.json")))
    vlm = None
    if meta.get("model_type") == "vit":  # a bare ViT (pretrain_vit.py's output): its patch tokens
        vit, qformer, a.features = load_vit(a.qformer), None, "vit"
        meta = {"image_size": vit.config.image_size}
    elif meta.get("stage") == 2:  # a stage-2 folder: the Q-Former as stage 2 left it
        meta = meta["stage1"]
        if a.n_captions > 0:  # the whole model, to caption with; its ViT and Q-Former are the ones to probe
            from train_vlm import load_vlm
            vlm = load_vlm(a.qformer)[0]
            vit, qformer = vlm.vit, vlm.qformer
        else:
            vit, qformer = build_stage1(meta, os.path.join(a.qformer, "qformer.safetensors"))
    else:
        vit, qformer, _, meta = load_stage1(a.qformer)
    vit.eval()
    if qformer is not None:
        qformer.eval()
    size = meta["image_size"]
    x_tr, s_tr = features(vit, qformer, "train", a.n_train, size, a.features)
    x_ev, s_ev = features(vit, qformer, "val", a.n_eval, size, a.features)
    print(f"probes on {a.features} features ({x_tr.size(1)} tokens x {x_tr.size(2)}) of {a.qformer}: "
          f"{a.n_train} training images, {a.n_eval} held-out")
    results = run_probes(x_tr, s_tr, x_ev, s_ev, a.attention)
    caps = caption_accuracy(vlm, size, a.n_captions) if vlm is not None else {}
    for name, (n, acc, chance, *att) in results.items():
        att = f", attention probe {att[0]:.3f}" if att else ""
        said = f"  | captions {caps[name][1]:.3f} ({caps[name][0]} images)" if name in caps else ""
        print(f"  {name:22s} held-out: linear {acc:.3f}{att}  (chance {chance:.3f}; fitted on {n} images){said}")
    return results, caps


if __name__ == "__main__":
    run_cli(main)
