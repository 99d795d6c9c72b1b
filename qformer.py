"""
The BLIP-2 Q-Former: a BERT whose layers also carry 32 learned query tokens. The queries cross-attend to the
frozen image features (every `cross_attention_freq`-th layer) and have their own FFN; the text tokens are plain
BERT. What the two streams may see of each other is set by one of four attention masks, one per objective:

  queries alone   (ITC image side)  queries <-> queries, + image
  text alone      (ITC text side)   text <-> text, exactly BERT
  bidirectional   (ITM)             [queries; text] all see all, + image
  multimodal causal (ITG)           queries see queries only; text sees all queries and earlier text

Module names follow bert-base-uncased and LAVIS (crossattention, intermediate_query, query_tokens, itm_head, ...)
so a pretrained BERT loads by name and the code reads side by side with the reference.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import attention, attention_probs, split_heads, merge_heads


@dataclass
class QFormerConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    vision_width: int = 768         # width of the frozen image features the queries cross-attend to
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    embed_dim: int = 256            # ITC projection
    dec_token_id: int = 1           # [DEC] starts ITG text; bert's "[unused0]", so the vocabulary keeps its size
    text_pooling: str = "cls"       # ITC text feature: BLIP-2 takes [CLS]; "mean" suits sentence-embedding BERTs
                                    # (all-MiniLM-L6-v2 was trained with mean pooling: its [CLS] barely varies)


# ---- the four attention modes: bool masks, True = may attend, shaped to broadcast over [B, heads, rows, cols]

def text_mask(attention_mask):
    """Text alone: every token sees every real (non-pad) token."""
    return attention_mask.bool()[:, None, None, :]


def queries_mask():
    """Queries alone: all 32 queries see each other; nothing to hide."""
    return None


def bidirectional_mask(n_query, attention_mask):
    """ITM: [queries; text] all see all real tokens."""
    keys = torch.cat([attention_mask.new_ones(attention_mask.size(0), n_query), attention_mask], dim=1)
    return keys.bool()[:, None, None, :]


def multimodal_causal_mask(n_query, attention_mask):
    """ITG: queries see only queries (so they cannot leak the caption); text sees all queries and earlier text."""
    B, T = attention_mask.shape
    n = n_query + T
    m = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    m[:, :n_query] = True      # everyone sees the queries
    m[:n_query, n_query:] = False  # queries never see text
    keys = torch.cat([attention_mask.new_ones(B, n_query), attention_mask], dim=1).bool()
    return (m[None] & keys[:, None, :])[:, None]


# ---- modules

class BertSelfAttention(nn.Module):
    def __init__(self, cfg, kv_width):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def forward(self, x, kv, mask, probs=False):
        """probs: also return the attention map, averaged over the heads [B, T, S] (the "ground" loss's)."""
        q, k, v = split_heads(self.query(x), self.n_head), split_heads(self.key(kv), self.n_head), \
            split_heads(self.value(kv), self.n_head)
        if not probs:
            return merge_heads(attention(q, k, v, mask=mask))
        att = attention_probs(q, k, mask)
        return merge_heads((att @ v.float()).to(v.dtype)), att.mean(1)


class BertResidual(nn.Module):
    """BERT is post-LN: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, cfg, in_width):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, x):
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, cfg, kv_width):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertResidual(cfg, cfg.hidden_size)

    def forward(self, x, kv=None, mask=None, probs=False):
        if probs:
            h, p = self.self(x, x if kv is None else kv, mask, probs=True)
            return self.output(h, x), p
        return self.output(self.self(x, x if kv is None else kv, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.has_cross = layer_idx % cfg.cross_attention_freq == 0
        if self.has_cross:
            self.crossattention = BertAttention(cfg, cfg.vision_width)
        self.intermediate, self.output = BertIntermediate(cfg), BertResidual(cfg, cfg.intermediate_size)
        self.intermediate_query, self.output_query = BertIntermediate(cfg), BertResidual(cfg, cfg.intermediate_size)

    def forward(self, x, mask, n_query, image_embeds, probs=False):
        """probs: also return the queries' cross-attention map, averaged over the heads [B, n_query, S]."""
        x, p = self.attention(x, mask=mask), None
        q, t = x[:, :n_query], x[:, n_query:]
        if n_query > 0:
            if self.has_cross and image_embeds is not None:
                if probs:
                    q, p = self.crossattention(q, kv=image_embeds, probs=True)
                else:
                    q = self.crossattention(q, kv=image_embeds)
            q = self.output_query(self.intermediate_query(q), q)
        if t.size(1) > 0:
            t = self.output(self.intermediate(t), t)
        x = torch.cat([q, t], dim=1)
        return (x, p) if probs else x


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids=None, query_embeds=None):
        parts = [] if query_embeds is None else [query_embeds]  # queries get no position: they are a set
        if input_ids is not None:
            pos = torch.arange(input_ids.size(1), device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos)
                         + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))


class MLMHead(nn.Module):
    """BERT's cls.predictions: transform, then a decoder tied to the word embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h, word_embeddings, vocab=None):
        """vocab: the ids of word_embeddings' rows, where they are a subset of the vocabulary."""
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(h)))
        return F.linear(h, word_embeddings, self.bias if vocab is None else self.bias[vocab])


def run_layer(layer, *args):
    """layer(*args) as a plain function, for QFormer.compile_layers."""
    return layer(*args)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.ln_vision = nn.LayerNorm(cfg.vision_width)  # BLIP-2 normalises the frozen ViT output first
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.cls = nn.Module()
        self.cls.predictions = MLMHead(cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        self.vision_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.apply(_init_weights)
        nn.init.normal_(self.query_tokens, std=0.02)

    def forward(self, input_ids=None, mask=None, image_embeds=None, with_queries=False, probs_layer=None):
        """One pass through the layers. image_embeds are the raw ViT features (ln_vision is applied here).
        Returns hidden states [B, (32 if with_queries) + T, H]; with probs_layer (a layer's index), also that
        layer's cross-attention map [B, 32, S], averaged over the heads."""
        B = (input_ids if input_ids is not None else image_embeds).size(0)
        query = self.query_tokens.expand(B, -1, -1) if with_queries else None
        n_query = query.size(1) if with_queries else 0
        if image_embeds is not None:
            image_embeds = self.ln_vision(image_embeds)
        x = self.embeddings(input_ids, query)
        run = getattr(self, "_layer", run_layer)
        probs = None
        for i, layer in enumerate(self.encoder.layer):
            if i == probs_layer:
                x, probs = run(layer, x, mask, n_query, image_embeds, True)
            else:
                x = run(layer, x, mask, n_query, image_embeds)
        return x if probs_layer is None else (x, probs)

    def compile_layers(self):
        """torch.compile the layers (forward and backward): one graph per kind of layer (with or without
        cross-attention) and attention mode serves them all, compiled in seconds on a CPU (as Llama's)."""
        self._layer = torch.compile(run_layer)
        return self

    def encode_image(self, image_embeds, probs_layer=None):
        """Queries alone, cross-attending to the image: [B, 32, H] (and, with probs_layer, that layer's
        cross-attention map: forward's)."""
        return self(image_embeds=image_embeds, mask=queries_mask(), with_queries=True, probs_layer=probs_layer)

    def encode_text(self, input_ids, attention_mask):
        """Text alone: exactly BertModel's last_hidden_state."""
        return self(input_ids=input_ids, mask=text_mask(attention_mask))

    def text_feature(self, input_ids, attention_mask):
        """The ITC text embedding [B, embed_dim], L2-normalised."""
        h = self.encode_text(input_ids, attention_mask)
        if self.config.text_pooling == "mean":
            m = attention_mask[..., None].to(h.dtype)
            h = (h * m).sum(1) / m.sum(1)
        else:
            h = h[:, 0]
        with fp32(h):
            return F.normalize(self.text_proj(h.float()), dim=-1)

    def image_feature(self, image_embeds, h=None):
        """The ITC image embeddings [B, 32, embed_dim], one per query, L2-normalised (h: encode_image's output,
        where the caller has it)."""
        h = self.encode_image(image_embeds) if h is None else h
        with fp32(h):
            return F.normalize(self.vision_proj(h.float()), dim=-1)

    def itm_logits(self, image_embeds, input_ids, attention_mask):
        """ITM: the query outputs of a bidirectional pass, each scored by itm_head, averaged: [B, 2]."""
        n = self.config.num_query_tokens
        h = self(input_ids, bidirectional_mask(n, attention_mask), image_embeds, with_queries=True)
        return self.itm_head(h[:, :n]).mean(dim=1)

    def slot_logits(self, h, vocab):
        """Slots: each query output (h: encode_image's) scored by the MLM head over the words `vocab` only."""
        return self.cls.predictions(h, self.embeddings.word_embeddings.weight[vocab], vocab)

    def itg_logits(self, image_embeds, input_ids, attention_mask, where=None):
        """ITG: next-token logits [B, T, V] for text that starts with [DEC], under the multimodal causal mask;
        with `where` ([B, T] bool), only at those positions: [N, V]."""
        n = self.config.num_query_tokens
        h = self(input_ids, multimodal_causal_mask(n, attention_mask), image_embeds, with_queries=True)[:, n:]
        return self.cls.predictions(h if where is None else h[where], self.embeddings.word_embeddings.weight)


def _init_weights(m):
    # BERT's init; it only matters for what the checkpoint does not provide (cross-attention, heads, queries)
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

# -----------------------------------------------------------------------------------------------------------
# the three stage-1 objectives


def fp32(x):
    """Autocast off, for the ITC features and similarities: at temperature 0.02 a logit is a cosine x 50, and
    bf16's ~3 significant digits would put an error of ~0.2 on logits that differ by less early on."""
    return torch.autocast(x.device.type, enabled=False)


def itc_similarity(img_feats, txt_feat):
    """img_feats [Bi,32,E], txt_feat [Bt,E] (both L2-normalised) -> [Bi,Bt]: the best-matching query per pair."""
    with fp32(img_feats):
        return torch.einsum("iqe,te->itq", img_feats.float(), txt_feat.float()).max(dim=-1).values


def hard_negatives(sim, same, generator=None, offset=0, total=None):
    """For each row, a column drawn with probability softmax(sim) among the columns that are not positives
    (`same`). Gumbel-max sampling with noise drawn for the whole global batch (`total` rows, this process's
    starting at `offset`), so that every DDP process draws what a single process would. A row with no negative
    at all falls back to uniform."""
    B = sim.size(0)
    total = B if total is None else total
    g = torch.rand(total, sim.size(1), generator=generator).to(sim.device)[offset:offset + B]
    logits = sim.float().masked_fill(same, float("-inf"))
    logits = torch.where(same.all(1, keepdim=True), torch.zeros_like(logits), logits)
    return (logits - torch.log(-torch.log(g.clamp_min(1e-20)))).argmax(dim=1)


def slots_scored(slot_ids):
    """Which slots are scored: the words and the first [PAD] after them (the end), not the [PAD]s after that."""
    return (slot_ids == 0).long().cumsum(1) <= 1


def stage1_losses(qf, image_embeds, input_ids, attention_mask, key_ids, losses=("itc", "itm", "itg"),
                  env=None, generator=None, slot_ids=None, slot_cover=None, ground_layer=1):
    """BLIP-2's ITC, ITM and ITG on one (local) batch, and slots and ground where the data names its scenes word
    by word.
    key_ids: an int per sample naming its content, so that duplicates (the same scene, captioned alike) count as
    positives in ITC and are never drawn as ITM negatives.
    env (trainer.Env) gathers across DDP processes, whose local batches may differ in size; each loss is a sum
    over the local samples scaled so that DDP's average over processes is the mean over the global batch, what
    one process would compute on all of it. generator: seeds the hard-negative draw identically on every
    process.
    slot_ids [B, n_query]: for "slots", the word query k must name (its token id through the MLM head), [PAD]
    after the last word; the first [PAD] is scored (where the scene ends), the rest are free.
    slot_cover [B, S, patches]: for "ground", the share of each image patch covered by the object slot k's word
    describes (zeros for other slots); query k's cross-attention in layer `ground_layer` should fall there.
    -> {name: loss}"""
    B, out = input_ids.size(0), {}
    rank, world = (env.rank, env.world) if env is not None else (0, 1)
    sizes = env.sizes(B) if env is not None else [B]
    N, offset = sum(sizes), sum(sizes[:rank])
    gather = (lambda x: env.gather(x, sizes)) if env is not None else (lambda x: x)
    gather_nograd = (lambda x: env.gather_nograd(x, sizes)) if env is not None else (lambda x: x)
    all_keys = gather_nograd(key_ids)
    same = key_ids[:, None] == all_keys[None]  # [B, N]: positives (the pair itself included)
    h_query = None
    if "ground" in losses:
        # the query that names an object's words looks at that object: which of three objects is "the middle
        # one" is otherwise left to the words' loss alone to find (EXPERIMENTS.md). On a middle layer, so that
        # the layers after it may still look elsewhere.
        h_query, probs = qf.encode_image(image_embeds, probs_layer=ground_layer)
        S = slot_cover.size(1)
        mass = (probs[:, :S, -slot_cover.size(2):] * slot_cover).sum(-1)  # the patches: after the [CLS] token
        scored = slot_cover.sum(-1) > 0
        n = scored.sum()
        total = (env.sum(n) if env is not None else n).clamp_min(1)
        out["ground"] = -(mass.clamp_min(1e-6).log() * scored).sum() * world / total
    elif "itc" in losses or "itm" in losses or "slots" in losses:
        h_query = qf.encode_image(image_embeds)
    if "itc" in losses or "itm" in losses:
        with torch.no_grad():
            qf.temp.clamp_(0.001, 0.5)
        img_feats, txt_feat = qf.image_feature(image_embeds, h_query), qf.text_feature(input_ids, attention_mask)
        sim_i2t = itc_similarity(img_feats, gather(txt_feat)) / qf.temp
        sim_t2i = itc_similarity(gather(img_feats), txt_feat).t() / qf.temp
        if "itc" in losses:
            ce = lambda s, pos: F.cross_entropy(s.float(), pos.float() / pos.float().sum(1, keepdim=True),
                                                label_smoothing=0.1, reduction="sum")
            out["itc"] = (ce(sim_i2t, same) + ce(sim_t2i, same)) / 2 * world / N
    if "itm" in losses:
        all_img, all_ids, all_mask = gather_nograd(image_embeds), gather_nograd(input_ids), \
            gather_nograd(attention_mask)
        with torch.no_grad():
            neg_txt = hard_negatives(sim_i2t, same, generator, offset, N)
            neg_img = hard_negatives(sim_t2i, same, generator, offset, N)
        pad = lambda x: F.pad(x, (0, all_ids.size(1) - x.size(1)))  # other processes' text may be longer
        imgs = torch.cat([image_embeds, image_embeds, all_img[neg_img]])
        ids = torch.cat([pad(input_ids), all_ids[neg_txt], pad(input_ids)])
        mask = torch.cat([pad(attention_mask), all_mask[neg_txt], pad(attention_mask)])
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        # a drawn "negative" can only be a positive when the whole global batch shares one content
        labels[B:2 * B] = same.gather(1, neg_txt[:, None]).squeeze(1).long()
        labels[2 * B:] = same.gather(1, neg_img[:, None]).squeeze(1).long()
        logits = qf.itm_logits(imgs, ids, mask).float()
        out["itm"] = F.cross_entropy(logits, labels, reduction="sum") * world / (3 * N)
    if "itg" in losses:
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = qf.config.dec_token_id  # [DEC] replaces [CLS]: "now describe the image"
        where = attention_mask[:, 1:] == 1  # position t predicts token t+1, wherever that is real text
        # the 30k-wide vocabulary head only where there are labels: on padding it would be a third of ITG's cost
        logits = qf.itg_logits(image_embeds, dec_ids, attention_mask, F.pad(where, (0, 1)))
        labels = dec_ids[:, 1:][where]
        # token-mean over the *global* batch, so DDP's average over processes equals one process's loss
        n_tokens = where.sum()
        total = (env.sum(n_tokens) if env is not None else n_tokens).clamp_min(1)
        out["itg"] = F.cross_entropy(logits.float(), labels, label_smoothing=0.1, reduction="sum") * world / total
    if "slots" in losses:
        # query k names the scene's k-th word: the queries must keep which object is where and in what order,
        # which ITC against whole captions hardly asks (EXPERIMENTS.md). Scored over the words the global batch's
        # slots hold (a sampled softmax): the 30k-wide head would cost more than the rest of the step.
        vocab = torch.unique(gather_nograd(slot_ids))
        logits = qf.slot_logits(h_query, vocab)
        labels = torch.searchsorted(vocab, slot_ids).masked_fill(~slots_scored(slot_ids), -100)
        n = (labels >= 0).sum()
        total = (env.sum(n) if env is not None else n).clamp_min(1)
        out["slots"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") * world / total
    return out
