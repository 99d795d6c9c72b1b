"""
Pretrain the offline path's ViT on the shapes world, as google/vit was pretrained on ImageNet before BLIP-2 froze
it: from the pixels and the scene alone, never from the captions' text. Dense targets, per patch token: which
object covers the patch (its colour, shape and size, or the background), where that object's centre lies from the
patch, and where the patch itself is; on the CLS token, how many objects there are. So the tokens hold *what* and
*where*, as a pretrained ViT's do, and the Q-Former that cross-attends to them can pass both on.

    python pretrain_vit.py                        # ~1 h on 2 CPU cores; writes assets/shapes-vit (fp16, HF layout)
    python pretrain_vit.py --max_steps 200        # a quick look

Only training-split images are used (data.SPLIT_SEEDS), so stage 1 and 2's held-out images stay unseen. The output
folder is google/vit's checkpoint layout (config.json + model.safetensors): load_weights.load_vit and transformers'
ViTModel.from_pretrained both read it.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from load_weights import save_vit
from model import ViT, ViTConfig
from trainer import Env, TrainConfig, make_optimizer, parse_config, resume, run_cli, train


@dataclass
class PretrainConfig(TrainConfig):
    """Dense pretraining of a small ViT on shapes images (the shared fields are in trainer.TrainConfig)."""
    out_dir: str = "out/shapes-vit"
    export_dir: str = "assets/shapes-vit"   # the HF-layout folder the shapes presets load
    data: str = "shapes"
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    cover: float = 0.15                     # a patch belongs to an object when it covers this share of it
    batch_size: int = 64
    max_steps: int = 3000
    warmup_steps: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-5
    eval_interval: int = 500
    eval_samples: int = 512
    log_interval: int = 50
    num_workers: int = 1


class PatchTargets(torch.utils.data.Dataset):
    """(pixels, per-patch targets) of shapes images, built from each scene: colour / shape / size class of the
    object over the patch (0 = background), offset of its centre from the patch centre, and the object count."""

    def __init__(self, split, n, image_size, patch_size, cover):
        self.ds, self.grid, self.cover = data.ShapesDataset(split, n, image_size), image_size // patch_size, cover

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        pixels = self.ds[i][0]
        scene = data.shape_scene(self.ds.seed, i)
        objs, g = scene["objects"], self.grid
        cov = data.object_coverage(scene, g)  # [g, g, 1 + n]
        k = cov[..., 1:].argmax(-1)
        on = cov[..., 1:].max(-1) >= self.cover
        cls = lambda values, j: np.array([values.index(o[j]) + 1 for o in objs])[k] * on
        centre = (np.arange(g) + 0.5) / g
        ox = np.array([o[3] for o in objs])[k] - centre[None, :]
        oy = np.array([o[4] for o in objs])[k] - centre[:, None]
        t = {"colour": cls(list(data.COLOURS), 1), "shape": cls(list(data.SHAPES), 2), "size": cls(list(data.SIZES), 0),
             "offset": np.stack([ox, oy], -1) * on[..., None], "count": len(objs) - 1}
        return pixels, {name: torch.as_tensor(v).flatten(0, 1) if name != "count" else torch.tensor(v)
                        for name, v in t.items()}, i


def collate(samples):
    out = {"pixel_values": torch.stack([s[0] for s in samples]), "index": torch.tensor([s[2] for s in samples])}
    for name in samples[0][1]:
        out[name] = torch.stack([s[1][name] for s in samples])
    return out


class DenseHeads(nn.Module):
    """Linear read-outs from the ViT's last hidden state (after its final LayerNorm: what the Q-Former sees)."""

    def __init__(self, width, grid):
        super().__init__()
        self.grid = grid
        self.colour, self.shape = nn.Linear(width, 1 + len(data.COLOURS)), nn.Linear(width, 1 + len(data.SHAPES))
        self.size, self.offset = nn.Linear(width, 1 + len(data.SIZES)), nn.Linear(width, 2)
        self.row, self.col = nn.Linear(width, grid), nn.Linear(width, grid)
        self.count = nn.Linear(width, 3)

    def forward(self, h, batch):
        """-> ({loss name: loss}, {metric: accuracy}) for a batch of ViT outputs h [B, 1 + g*g, D]."""
        p, dev = h[:, 1:], h.device
        on = batch["colour"].to(dev) > 0
        pos = torch.arange(self.grid ** 2, device=dev).expand(len(h), -1)
        losses, acc = {}, {}
        for name, target in (("colour", batch["colour"]), ("shape", batch["shape"]), ("size", batch["size"]),
                             ("row", pos // self.grid), ("col", pos % self.grid)):
            logits = getattr(self, name)(p)
            target = target.to(dev)
            losses[name] = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
            right = logits.argmax(-1) == target
            acc[name] = (right[on] if name in ("colour", "shape", "size") else right).float().mean()  # on objects
        err = (self.offset(p).float() - batch["offset"].to(dev).float()).pow(2).sum(-1)
        losses["offset"] = 10 * err[on].mean()  # offsets are ~0.1 image widths: scaled to the other losses
        count = self.count(h[:, 0])
        losses["count"] = F.cross_entropy(count.float(), batch["count"].to(dev))
        acc["count"] = (count.argmax(-1) == batch["count"].to(dev)).float().mean()
        return losses, acc


class Pretrain(nn.Module):
    def __init__(self, vit, heads):
        super().__init__()
        self.vit, self.heads = vit, heads

    def forward(self, batch):
        return self.heads(self.vit(batch["pixel_values"].to(self.heads.row.weight.device)), batch)


def main(argv=None):
    cfg = parse_config(PretrainConfig, argv=argv)
    env = Env(cfg.device, cfg.dtype, cfg.seed)
    vit = ViT(ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                        intermediate_size=4 * cfg.hidden_size))
    model = Pretrain(vit, DenseHeads(cfg.hidden_size, cfg.image_size // cfg.patch_size)).to(env.device)
    env.print(f"pretraining a ViT ({sum(p.numel() for p in vit.parameters()) / 1e6:.2f}M parameters, "
              f"{cfg.layers} layers x {cfg.hidden_size}) on shapes, device {env.device} {env.dtype}")
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, env.device)
    sd, start, extra = resume(cfg, env, optimizer)
    if sd is not None:
        model.load_state_dict(sd)
    ds = PatchTargets("train", cfg.n_train, cfg.image_size, cfg.patch_size, cfg.cover)
    val = PatchTargets("val", cfg.eval_samples, cfg.image_size, cfg.patch_size, cfg.cover)
    sampler = data.StepSampler(len(ds), cfg.batch_size, cfg.seed, env.rank, env.world, start * cfg.grad_accum)
    batches = iter(torch.utils.data.DataLoader(ds, cfg.batch_size, sampler=sampler, collate_fn=collate,
                                               num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0))

    def step_fn(batch, ddp_model):
        losses, _ = ddp_model(batch)
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def evaluate():
        accs = []
        for batch in torch.utils.data.DataLoader(val, 128, collate_fn=collate):
            with env.autocast():
                accs.append(model(batch)[1])
        m = {k: float(np.mean([a[k].item() for a in accs])) for k in accs[0]}
        m["score"] = m["shape"]
        return m

    t0 = time.time()
    train(cfg, env, model, optimizer, batches, step_fn, evaluate, model.state_dict, start, extra)
    if env.is_main:
        save_vit(vit, cfg.export_dir, dtype=torch.float16)
        env.print(f"done in {(time.time() - t0) / 60:.1f} min; the ViT (google/vit layout, fp16) is in "
                  f"{cfg.export_dir}")


if __name__ == "__main__":
    run_cli(main)
