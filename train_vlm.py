"""
Stage 2: teach SmolLM2 to see. The stage-1 Q-Former's query outputs go through an MLP into the LM's embedding
space, inside the user turn of a chat prompt; LoRA adapters on the LM and the MLP learn to caption (the Q-Former
follows at a lower learning rate). The ViT and the LM's own weights stay frozen.

    python train_vlm.py --lora_rank 8                                   # after python train_qformer.py
    python train_vlm.py --preset shapes --qformer out/shapes-qformer    # offline, CPU
"""
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import data
import lora
from load_weights import load_llm, load_strict, offline_paths
from metrics import bleu4, cider_d, shape_attribute_accuracy
from trainer import (CheckpointError, Env, TrainConfig, compiled, freeze_to, make_optimizer, parse_config, resume,
                     run_cli, save_weights, train, write_text)
from train_qformer import build_dataset, open_feature_cache, build_stage1, load_stage1, train_batches

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
EOS_ID = 2  # <|im_end|> ends a turn (and is also SmolLM2's pad id: labels are set before padding, see below)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
USER_PROMPTS = ["What do you see in this image?", "Describe this image.", "What is in the picture?",
                "Caption this image."]
RETENTION_QUESTIONS = ["What is the capital of France?", "How many days are there in a week?",
                       "What is the largest planet in the solar system?", "Who wrote Romeo and Juliet?"]
# Text-only turns replayed during training with the base LM's own answers, so that LoRA learns to caption
# without rewriting plain chat. Deliberately disjoint from the retention probe above, which stays a held-out test.
REPLAY_QUESTIONS = ["What is 2 + 2?", "Name a primary colour.", "What is the opposite of hot?",
                    "Who painted the Mona Lisa?", "What is the chemical symbol for gold?",
                    "How many legs does a spider have?", "What is the tallest mountain in the world?",
                    "What language is spoken in Brazil?", "What do bees make?", "Which ocean is the largest?",
                    "Who was the first person to walk on the Moon?", "Name three fruits.",
                    "What gas do plants absorb from the air?", "How many continents are there?",
                    "What is the currency of Japan?", "Write a short greeting.", "Hello! How are you?",
                    "What can you help me with?", "What is the capital of Italy?", "How many hours are in a day?",
                    "What is water made of?", "Give me a synonym for happy.", "What is the boiling point of water?",
                    "Tell me a fun fact about cats."]


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2: MLP projector + LoRA on SmolLM2 (+ the Q-Former at a lower learning rate). The shared fields
    (data, loop, logging) are in trainer.TrainConfig; the image size comes from the stage-1 run."""
    out_dir: str = "out/vlm"
    qformer: str = "out/qformer"       # a stage-1 output folder
    llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # folder, HF id, .gguf; "gguf" = the pip-installed SmolLM2
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    freeze_qformer: bool = False
    cache_features: bool = False       # frozen Q-Former, map-style data: encode the training images once, up front
    warmup_projector: int = 0          # steps that teach the projector the LM's words before the LM trains (below)
    warmup_projector_batch: int = 64
    warmup_projector_lr: float = 3e-3
    replay_ratio: float = 0.125        # share of samples that are text-only turns with the base LM's own answers
    replay_tokens: int = 24            # answer tokens kept per replayed turn (longer rows would pad whole batches)
    qformer_lr_scale: float = 0.1      # the Q-Former trains on at lr * this
    merge: bool = False                # also write the LM with LoRA merged in, as safetensors
    max_caption_tokens: int = 48
    max_new_tokens: int = 48           # eval: generated caption length
    batch_size: int = 16
    max_steps: int = 5000
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 200
    weight_decay: float = 0.0
    eval_samples: int = 200


PRESETS = {
    # Offline, 2 CPU cores. The Q-Former stays as stage 1 left it, so its outputs for the training images are
    # computed once; the projector is warmed up on them (seconds, no LM) before the LM trains (EXPERIMENTS.md).
    "shapes": dict(qformer="out/shapes-qformer", llm="gguf", data="shapes", n_train=4096, freeze_qformer=True,
                   cache_features=True, warmup_projector=600, batch_size=8, max_steps=150, warmup_steps=10, lr=1e-3,
                   min_lr=1e-4, eval_interval=150, eval_samples=200, log_interval=10, num_workers=0,
                   lora_targets="q_proj,v_proj", lora_dropout=0.0, max_new_tokens=40, out_dir="out/shapes-vlm"),
    # Real pictures (train_qformer.py --preset real first); the same recipe as shapes.
    "real": dict(qformer="out/real-qformer", llm="gguf", data="real", n_train=2000, freeze_qformer=True,
                 cache_features=True, warmup_projector=600, batch_size=8, max_steps=150, warmup_steps=10, lr=1e-3,
                 min_lr=1e-4, eval_interval=150, eval_samples=336, log_interval=10, num_workers=0,
                 lora_targets="q_proj,v_proj", lora_dropout=0.0, max_new_tokens=24, out_dir="out/real-vlm"),
    "tiny": dict(qformer="out/tiny-qformer", llm="gguf", data="shapes", batch_size=2, max_steps=2, warmup_steps=1,
                 eval_interval=2, eval_samples=4, log_interval=1, num_workers=0, max_new_tokens=4, n_train=16,
                 out_dir="out/tiny-vlm"),
}


class VLM(nn.Module):
    def __init__(self, vit, qformer, llm, tokenizer):
        super().__init__()
        self.vit, self.qformer, self.llm, self.tok = vit, qformer, llm, tokenizer
        h, d = qformer.config.hidden_size, llm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(h, d), nn.GELU(), nn.Linear(d, d))

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()  # the ViT is frozen: no dropout
        return self

    def encode(self, pixel_values):
        """[B,3,H,W] -> the Q-Former's query outputs [B, n_query, hidden] (what a feature cache holds)."""
        with torch.no_grad():
            feats = self.vit(pixel_values)
        return self.qformer.encode_image(feats)

    def image_embeds(self, images):
        """Pixels [B,3,H,W] or cached query outputs [B, n_query, hidden] -> [B, n_query, lm_hidden]: the LM's
        view of the image."""
        return self.projector(self.encode(images) if images.dim() == 4 else images.to(self.projector[0].weight.dtype))

    def embed(self, input_ids, image_mask, img):
        """Token embeddings with the image embeddings written into the placeholder positions."""
        x = self.llm.model.embed_tokens(input_ids)
        return x.masked_scatter(image_mask[..., None], img.to(x.dtype))

    def forward(self, batch, reduction="mean"):
        """Cross-entropy over caption tokens (and their closing <|im_end|>): their mean, or with
        reduction="sum" (sum, number of tokens) for a mean over several processes' batches."""
        dev = self.projector[0].weight.device
        ids, targets = batch["lm_ids"].to(dev), batch["targets"].to(dev)
        pix = batch["pixel_values"].to(dev)
        img = self.image_embeds(pix) if len(pix) else self.projector[-1].weight.new_zeros(0)
        x = self.embed(ids, batch["image_mask"].to(dev), img)
        h = self.llm.hidden_states(inputs_embeds=x)  # right padding + causal attention: no mask needed
        where = targets != -100
        # the LM head only where there are labels: the 49152-wide logits elsewhere would be wasted work
        logits = self.llm.lm_head(h[where])
        if reduction == "sum":
            return F.cross_entropy(logits.float(), targets[where], reduction="sum"), where.sum()
        return F.cross_entropy(logits.float(), targets[where])

    @torch.no_grad()
    def for_decoding(self, dtype, prompt_dtype=None):
        """Inference only, as sample.py runs it: the adapters folded into the LM's weights (no LoRA products per
        token; merged in fp32, then rounded once) and the LM stored in dtype, the prompt read in prompt_dtype
        (None: dtype; sample.py takes both from trainer.decoding_dtypes). The ViT and Q-Former run once per image
        and stay in fp32. The adapters cannot be switched off afterwards."""
        lora.merge_lora(self.llm)
        self.llm.to(dtype)
        self.llm.read_prompts_in(prompt_dtype)
        return self

    @torch.no_grad()
    def generate_ids(self, pixel_values=None, prompts=None, **kw):
        """New token ids [B, n] for a batch (images optional: text-only chat when None); rows that finished
        early are padded with <|im_end|>."""
        dev = self.projector[0].weight.device
        n = len(pixel_values) if pixel_values is not None else len(prompts)
        prompts = prompts or [USER_PROMPTS[0]] * n
        n_img = self.qformer.config.num_query_tokens if pixel_values is not None else 0
        rows = [prompt_ids(self.tok, p, n_img) for p in prompts]
        T = max(len(r[0]) for r in rows)  # left-pad so every row's last token is the assistant header
        ids = torch.tensor([[EOS_ID] * (T - len(r[0])) + r[0] for r in rows], device=dev)
        img_mask = torch.tensor([[False] * (T - len(r[1])) + r[1] for r in rows], device=dev)
        am = torch.tensor([[0] * (T - len(r[0])) + [1] * len(r[0]) for r in rows], device=dev)
        if pixel_values is not None:
            x = self.embed(ids, img_mask, self.image_embeds(pixel_values.to(dev)))
        else:
            x = self.llm.model.embed_tokens(ids)
        return self.llm.generate(inputs_embeds=x, attention_mask=am, eos_token_id=EOS_ID, **kw)

    def generate(self, pixel_values=None, prompts=None, **kw):
        """Greedy/sampled replies for a batch (images optional: text-only chat when None). -> list of str."""
        out = self.generate_ids(pixel_values, prompts, **kw)
        return [self.tok.decode([t for t in row if t != EOS_ID]).strip() for row in out.tolist()]

# -----------------------------------------------------------------------------------------------------------
# prompts and labels


def prompt_ids(tok, user, n_image):
    """Token ids of a user turn + the assistant header, and a parallel list marking the n_image placeholder
    positions. With an image: no system turn and the image before the question, the shortest prompt that reads
    well (every token is a pass through 30 layers: a shapes sample is 47 tokens instead of 59 with a system turn,
    at the same accuracy, EXPERIMENTS.md). Without an image, exactly SmolLM2's chat template, default system
    prompt included (a stray newline changed its greedy answers)."""
    if not n_image:
        ids = tok.encode(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
                         f"{IM_START}assistant\n").ids
        return ids, [False] * len(ids)
    head = tok.encode(f"{IM_START}user\n").ids
    tail = tok.encode(f"\n{user}{IM_END}\n{IM_START}assistant\n").ids
    return head + [0] * n_image + tail, [False] * len(head) + [True] * n_image + [False] * len(tail)


class Stage2Collate:
    """Builds chat sequences: image placeholders, a random user prompt, caption + <|im_end|>.
    targets[t] is the token to predict at position t (-100 = no loss): only the caption and its <|im_end|>.
    Targets are made before padding, so padding with id 2 can never erase the real <|im_end|> label."""

    def __init__(self, tok, n_image, max_caption_tokens, seed=0, replay=(), replay_ratio=0.0):
        self.tok, self.n_image, self.max_cap, self.seed = tok, n_image, max_caption_tokens, seed
        self.replay, self.replay_ratio = replay, replay_ratio  # [(question, answer ids incl. any <|im_end|>)]

    def sequence(self, caption, index):
        """(token ids, image-placeholder mask, targets) of one sample, unpadded."""
        rng = random.Random(f"{self.seed}:{index}")  # prompts by sample: same in any worker, on resume
        if self.replay and rng.random() < self.replay_ratio:  # this sample becomes a text-only turn
            question, cap = rng.choice(self.replay)
            ids, img = prompt_ids(self.tok, question, 0)
        else:
            ids, img = prompt_ids(self.tok, rng.choice(USER_PROMPTS), self.n_image)
            cap = self.tok.encode(caption).ids[:self.max_cap] + [EOS_ID]
        targets = [-100] * (len(ids) - 1) + cap + [-100]  # position t predicts token t+1
        return ids + cap, img + [False] * len(cap), targets

    def lengths(self, ds):
        """Every sample's sequence length, for batching by length (map-style data that can give its captions
        without decoding the images; else None)."""
        if not hasattr(ds, "caption_and_key"):
            return None
        return [len(self.sequence(ds.caption_and_key(i)[0], i)[0]) for i in range(len(ds))]

    def __call__(self, samples):
        good = [s for s in samples if s is not None]
        batch = {"skipped": len(samples) - len(good)}
        if not good:
            return batch
        seqs = [self.sequence(caption, index) for _, caption, _, index in good]
        with_image = [any(s[1]) for s in seqs]
        T = max(len(s[0]) for s in seqs)
        batch["lm_ids"] = torch.tensor([s[0] + [EOS_ID] * (T - len(s[0])) for s in seqs])
        batch["image_mask"] = torch.tensor([s[1] + [False] * (T - len(s[1])) for s in seqs])
        batch["targets"] = torch.tensor([s[2] + [-100] * (T - len(s[2])) for s in seqs])
        # only the rows with image placeholders: their embeddings fill the placeholders in row order
        pix = [s[0] for s, w in zip(good, with_image) if w]
        batch["pixel_values"] = torch.stack(pix) if pix else torch.zeros(0, *good[0][0].shape)
        batch["captions"] = [s[1] for s in good]
        batch["keys"] = [s[2] for s in good]
        batch["index"] = torch.tensor([s[3] for s in good])
        return batch

def caption_loss(model, batch, env):
    """The token-mean over the global batch (processes' local batches differ in tokens, and may in samples),
    scaled so that DDP's average over processes is exactly that."""
    total, n = model(batch, "sum")
    return total * env.world / env.sum(n).clamp_min(1)

@torch.no_grad()
def fill_cache(model, cache, env, batch_size=256):
    """Encode every training image not yet in the cache (each process its share, then all wait)."""
    todo = [i for i in range(len(cache)) if not cache.filled[i] and i % env.world == env.rank]
    t0 = time.time()
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        items = [cache.ds[i] for i in idx]
        keep = [k for k, it in enumerate(items) if it is not None]
        with env.autocast():
            q = model.encode(torch.stack([items[k][0] for k in keep]).to(env.device))
        cache.put(torch.tensor([idx[k] for k in keep]), q)
    if env.world > 1:
        torch.distributed.barrier()
    env.print(f"encoded {len(todo)} training images once ({time.time() - t0:.0f} s): the frozen Q-Former's outputs "
              "are read from the cache from now on")


def word_logits(model, feats, ids, extra):
    """Each projected image token's dot products with the LM's (tied) word embeddings: logits over the words in
    `ids` (lists of token ids) and the `extra` ids only, no 49k-wide softmax; in fp32.
    feats: cached query outputs [B, Q, H]. -> (logits [B, Q, C], where: token id -> column)"""
    emb = model.llm.model.embed_tokens.weight.detach()
    cand = torch.cat([torch.tensor([t for c in ids for t in c], dtype=torch.long), extra]).unique()
    where = torch.full((emb.size(0),), -1, dtype=torch.long)
    where[cand] = torch.arange(len(cand))
    x = model.image_embeds(feats)  # [B, Q, D]
    with torch.autocast(x.device.type, enabled=False):
        return x.float() @ emb[cand.to(emb.device)].float().t(), where


def word_loss(model, feats, caps, extra):
    """The projector warm-up's loss: the caption's tokens (caps: lists of ids) must be likely under the mixture of
    the image tokens' softmaxes over the words."""
    logits, where = word_logits(model, feats, caps, extra)
    mix = torch.logsumexp(logits.log_softmax(-1), dim=1) - math.log(logits.size(1))  # log of the mixture
    return -torch.stack([mix[b, where[c].to(mix.device)].mean() for b, c in enumerate(caps)]).mean()


def slot_loss(model, feats, slots, extra):
    """The warm-up's loss where stage 1 trained the queries to name the scene one word each, in reading order
    (slots): projected query k must read as slot word k; queries past the list are free.
    slots: per image, LM token ids, one per query from the first."""
    logits, where = word_logits(model, feats, slots, extra)
    labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
    for b, c in enumerate(slots):
        c = c[:labels.size(1)]
        labels[b, :len(c)] = where[torch.tensor(c, dtype=torch.long)]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(logits.device))


def warm_up_projector(model, cache, cfg, env, vocab_sample=2000, slots=False):
    """Before the LM trains, make the projected image tokens look like the caption's words to the LM (word_loss),
    or, where stage 1 trained slots, each token like its slot's word (slot_loss), so that the LM starts from
    what reads as the scene's words in order and has mostly to copy them into a sentence.
    No LM layer runs: thousands of images a minute on a CPU, against a few per second through the LM, and what
    the LM then learns to read from starts close (EXPERIMENTS.md: the stage-2 curve)."""
    vocab = model.llm.model.embed_tokens.weight.size(0)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=cfg.warmup_projector_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    end = model.tok.encode(".").ids[0]
    assert not slots or data.slot_words(cache.caption_and_key(0)[1]) is not None, \
        "the Q-Former was trained with slots, but this data has no slot words (shapes has)"
    t0 = time.time()
    for step in range(cfg.warmup_projector):
        idx = torch.randint(0, len(cache), (cfg.warmup_projector_batch,), generator=g).tolist()
        items = [it for it in (cache[i] for i in idx) if it is not None and it[0].dim() == 2]
        feats = torch.stack([it[0] for it in items]).to(env.device)  # float16 from the cache: not under autocast
        extra = torch.randint(0, vocab, (vocab_sample,), generator=g)
        with env.autocast():
            if slots:  # each word as the LM reads it inside a sentence (with its leading space), then "." (the end)
                ids = [[model.tok.encode(" " + w).ids[0] for w in data.slot_words(it[2])] + [end] for it in items]
                loss = slot_loss(model, feats, ids, extra)
            else:
                caps = [model.tok.encode(it[1]).ids[:cfg.max_caption_tokens] for it in items]
                loss = word_loss(model, feats, caps, extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.warmup_projector:
            env.print(f"projector warm-up {step + 1}/{cfg.warmup_projector} | loss {loss.item():.3f} | "
                      f"{(step + 1) * cfg.warmup_projector_batch / (time.time() - t0):.0f} images/s")

# -----------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def base_answers(model, questions, path, max_new_tokens=24):
    """The base LM's greedy answers (token ids, with <|im_end|> when it finished) to text-only questions,
    made once and kept in path (reused on --resume)."""
    if os.path.exists(path):
        return [(q, ids) for q, ids in json.load(open(path))]
    out = model.generate_ids(prompts=questions, max_new_tokens=max_new_tokens)
    answers = []
    for q, row in zip(questions, out.tolist()):
        answers.append((q, row[:row.index(EOS_ID) + 1] if EOS_ID in row else row))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text(path, json.dumps(answers))
    return answers


@torch.no_grad()
def retention_probe(model, max_new_tokens=32):
    return model.generate(prompts=RETENTION_QUESTIONS, max_new_tokens=max_new_tokens)


@torch.no_grad()
def evaluate(cfg, model, val_ds, env, shapes):
    """Greedy captions of the first eval_samples readable held-out images (map-style or streamed), scored by
    BLEU-4 / CIDEr-D, on shapes data by attribute accuracy, on real pictures by the objects named."""
    hyps, refs, idx, left = [], [], [], cfg.eval_samples
    for items in torch.utils.data.DataLoader(val_ds, batch_size=32, collate_fn=lambda xs: xs):
        items = [it for it in items if it is not None][:left]
        if not items:
            continue
        with env.autocast():
            hyps += model.generate(torch.stack([it[0] for it in items]), max_new_tokens=cfg.max_new_tokens)
        for it in items:
            refs.append(data.reference_captions(data.SPLIT_SEEDS["val"], it[3]) if shapes else [it[1]])
            idx.append(it[3])
        left -= len(items)
        if left == 0:
            break
    m = {"n_eval": len(hyps), "bleu4": bleu4(hyps, refs), "cider_d": cider_d(hyps, refs)}
    if shapes:
        m.update(shape_attribute_accuracy(hyps, [data.shape_scene(data.SPLIT_SEEDS["val"], i) for i in idx]))
    if hasattr(val_ds, "score_captions"):
        m.update(val_ds.score_captions(hyps, idx))
    m["score"] = m.get("attr_mean", m.get("named_fashion", m["cider_d"]))
    evaluate.last_captions = list(zip(hyps, [r[0] for r in refs]))
    return m


# -----------------------------------------------------------------------------------------------------------
# saving: a folder sample.py rebuilds the whole model from


EXPORT_FILES = ("adapter/adapter_model.safetensors", "projector.safetensors", "qformer.safetensors")


def export(cfg, model, meta, llm_src, out_dir, stamp):
    """Write what sample.py needs; stamp ({"run", "step"}) goes into every weights file, so that load_vlm can
    tell a folder whose files come from different runs or steps."""
    os.makedirs(out_dir, exist_ok=True)
    lora.save_adapter(model.llm, os.path.join(out_dir, "adapter"), base_model_name_or_path=llm_src, metadata=stamp)
    save_weights(os.path.join(out_dir, "projector.safetensors"), model.projector.state_dict(), stamp)
    save_weights(os.path.join(out_dir, "qformer.safetensors"),
                 {f"qformer.{k}": v for k, v in model.qformer.state_dict().items()}, stamp)
    config = {"stage": 2, "train_config": asdict(cfg), "llm": llm_src, "stage1": meta, **stamp,
              "image_size": meta["image_size"], "data_preset": cfg.preset or cfg.data,
              "num_query_tokens": model.qformer.config.num_query_tokens}
    write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
    if cfg.merge:
        merged = lora.merged_state_dict(model.llm)
        if model.llm.config.tie_word_embeddings:  # as HF checkpoints have it: the head is the embedding table
            merged.pop("lm_head.weight")
        save_weights(os.path.join(out_dir, "merged_lm.safetensors"), merged, stamp)


def load_vlm(folder, device="cpu"):
    """Rebuild the stage-2 model from an output folder (config.json + adapter/ + projector + qformer)."""
    meta = json.load(open(os.path.join(folder, "config.json")))
    for name in EXPORT_FILES:  # all written by one export (the same run and step), else refuse
        with safe_open(os.path.join(folder, name), "pt") as f:
            got = {k: (f.metadata() or {}).get(k) for k in ("run", "step")}
        if got != {"run": meta.get("run"), "step": meta.get("step")}:
            raise CheckpointError(f"{folder}: {name} (run {got['run']}, step {got['step']}) does not belong with "
                                  f"config.json (run {meta.get('run')}, step {meta.get('step')}); export again")
    llm_src = offline_paths()[1] if meta["llm"] == "gguf" else meta["llm"]
    llm, tok = load_llm(llm_src)
    lora.load_adapter(llm, os.path.join(folder, "adapter"))
    vit, qformer = build_stage1(meta["stage1"], os.path.join(folder, "qformer.safetensors"))
    model = VLM(vit, qformer, llm, tok)
    load_strict(model.projector, load_file(os.path.join(folder, "projector.safetensors")),
                os.path.join(folder, "projector.safetensors"))
    return model.to(device).eval(), meta


def main(argv=None):
    cfg = parse_config(Stage2Config, PRESETS, argv)
    env = Env(cfg.device, cfg.dtype, cfg.seed)
    if not os.path.exists(os.path.join(cfg.qformer, "config.json")):
        raise FileNotFoundError(f"no stage-1 output in '{cfg.qformer}': run train_qformer.py first, or pass "
                                "--qformer <its --out_dir>")
    vit, qformer, _, meta = load_stage1(cfg.qformer)
    llm_src = offline_paths()[1] if cfg.llm == "gguf" else cfg.llm
    llm, tok = load_llm(llm_src)
    model = VLM(vit, qformer, llm, tok).to(env.device)
    model.vit.requires_grad_(False)
    model.eval()
    with env.autocast():
        before = retention_probe(model)
        replay = base_answers(model, REPLAY_QUESTIONS, os.path.join(cfg.out_dir, "replay.json"), cfg.replay_tokens) \
            if cfg.replay_ratio > 0 else []
    lora.apply_lora(model.llm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.qformer.requires_grad_(not cfg.freeze_qformer)
    model.llm.to(env.device)
    for frozen in (model.vit, model.llm):  # the products autocast would compute, without a copy per step
        freeze_to(frozen, env.dtype)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    env.print(f"stage 2: LM {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M (frozen, LoRA r={cfg.lora_rank} "
              f"on {cfg.lora_targets}), {n_train / 1e6:.2f}M trainable, device {env.device} {env.dtype}")
    scale = {p: cfg.qformer_lr_scale for p in model.qformer.parameters()}
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay,
                               env.device, scale)
    trainable = lambda: {k: v for k, v in model.state_dict().items()
                         if k.startswith(("projector.", "qformer.")) or "lora_" in k}
    sd, start, extra = resume(cfg, env, optimizer)
    if sd is not None:
        missing = set(trainable()) - set(sd)
        assert not missing, f"checkpoint lacks {sorted(missing)[:5]}"
        model.load_state_dict(sd, strict=False)
    train_ds, map_style = build_dataset(cfg, "train", meta["image_size"], env)
    val_ds, _ = build_dataset(cfg, "val", meta["image_size"], env)
    if cfg.cache_features:
        assert map_style and cfg.freeze_qformer, "--cache_features needs --freeze_qformer and map-style data"
        cache = open_feature_cache(train_ds, os.path.join(cfg.out_dir, "qformer_cache"),
                                   qformer.config.num_query_tokens, qformer.config.hidden_size, env, cfg.resume)
        fill_cache(model, cache, env)
        train_ds = cache
    if cfg.warmup_projector and start == 0:
        assert cfg.cache_features, "--warmup_projector reads the cached Q-Former outputs: add --cache_features"
        warm_up_projector(model, train_ds, cfg, env, slots="slots" in meta["train_config"]["losses"].split(","))
    collate = Stage2Collate(tok, qformer.config.num_query_tokens, cfg.max_caption_tokens, cfg.seed, replay,
                            cfg.replay_ratio)
    batches = train_batches(cfg, train_ds, map_style, collate, env, start * cfg.grad_accum,
                            collate.lengths(train_ds) if map_style else None)
    trained = [model.llm] + ([] if cfg.freeze_qformer else [model.qformer])
    fwd = compiled(model, trained, env.device) if cfg.compile else model
    model.train()

    def step_fn(batch, ddp_model):
        loss = caption_loss(ddp_model if env.world > 1 else fwd, batch, env)
        return loss, {"caption": loss.detach()}

    shapes = cfg.data == "shapes"
    metrics, _ = train(cfg, env, model, optimizer, batches, step_fn,
                       lambda: evaluate(cfg, model, val_ds, env, shapes), trainable, start, extra)
    if env.is_main:
        model.eval()
        export(cfg, model, meta, "gguf" if cfg.llm == "gguf" else
               os.path.abspath(llm_src) if os.path.exists(llm_src) else llm_src, cfg.out_dir,
               {"run": extra["run"], "step": str(min(cfg.max_steps, cfg.halt_at or cfg.max_steps))})
        with env.autocast():
            after = retention_probe(model)
            with lora.lora_disabled(model.llm):
                base_again = retention_probe(model)
        env.print("\ntext-only retention (no image), before -> after training:")
        for q, b, a in zip(RETENTION_QUESTIONS, before, after):
            env.print(f"  Q: {q}\n     before: {b}\n     after:  {a}")
        env.print(f"  LoRA disabled reproduces the base model's answers: {base_again == before}")
        env.print("\nheld-out captions (generated | reference):")
        for h, r in getattr(evaluate, "last_captions", [])[:8]:
            env.print(f"  {h}  |  {r}")
        write_text(os.path.join(cfg.out_dir, "retention.json"),
                   json.dumps({"questions": RETENTION_QUESTIONS, "before": before, "after": after}, indent=2))
        env.print(f"\nsaved to {cfg.out_dir}: adapter/ (peft layout), projector.safetensors, qformer.safetensors, "
                  "config.json")
    if env.world > 1:
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    run_cli(main)
