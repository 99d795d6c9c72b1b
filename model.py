"""
The two frozen towers, written out in plain PyTorch:
1) ViT, exactly as google/vit-base-patch16-224 computes it (pre-LN blocks, CLS token, learned positions).
2) The Llama-architecture causal LM that SmolLM2 uses (RMSNorm, RoPE, grouped-query attention, SwiGLU),
   with a preallocated KV cache and a small `generate`.
Weights are loaded by load_weights.py; module names follow the HF checkpoints so the mapping stays short.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q, k, v, mask=None, causal=False):
    """q [B,H,T,D], k/v [B,H,S,D]. mask: bool, broadcastable to [B,H,T,S], True = may attend.
    `causal` is only honoured when there is no mask (one mask argument, never both: some SDPA backends
    reject attn_mask together with is_causal)."""
    if q.is_cuda:  # flash / memory-efficient kernels
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not grad and q.size(-2) > 1:  # CPU inference over many rows (the frozen ViT): SDPA's kernel, 1.5x faster;
        # in fp32 like the path below: as fast as in bf16 there, and the scores keep fp32 precision
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                             is_causal=causal and mask is None)
        return out.to(v.dtype)
    # On the CPU SDPA's backward is slow for small heads (DESIGN.md measured 2x on a Q-Former step), and its
    # kernel costs more than the product itself for one decoded row, so the textbook softmax(QK^T)V serves there.
    # In fp32: CPUs without bf16 units run bf16 batched matmuls several times slower (measured 5x in decoding).
    return (attention_probs(q, k, mask, causal) @ v.float()).to(v.dtype)


def attention_probs(q, k, mask=None, causal=False):
    """softmax(QK^T / sqrt(D)) in fp32, [B,H,T,S]: attention()'s textbook path, and the map itself where a loss
    reads it (the Q-Former's ground)."""
    att = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if mask is None and causal:
        T, S = q.size(-2), k.size(-2)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(dim=-1)


def split_heads(x, n_head):  # [B,T,H*D] -> [B,H,T,D]
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x):  # [B,H,T,D] -> [B,T,H*D]
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)

# -----------------------------------------------------------------------------------------------------------
# ViT


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    # DINOv2 (facebook/dinov2-*): each residual branch is scaled by a learned per-channel vector
    layer_scale: bool = False
    # side of the checkpoint's learned position grid; 0 = image_size // patch_size. When it differs from the
    # grid of the images in use (DINOv2 is trained at 518 px), the positions are resized, as transformers does
    position_grid: int = 0
    # the pixel statistics the checkpoint was trained with: our data gives pixels in [-1, 1] (google/vit's
    # mean = std = 0.5); DINOv2 expects ImageNet's, so forward() re-normalises
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    def __post_init__(self):
        self.position_grid = self.position_grid or self.image_size // self.patch_size
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        q, k, v = (split_heads(f(x), self.n_head) for f in (self.query, self.key, self.value))
        return self.dense(merge_heads(attention(q, k, v)))


class ViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = ViTSelfAttention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        scale = (lambda: nn.Parameter(torch.ones(cfg.hidden_size))) if cfg.layer_scale else (lambda: None)
        self.layer_scale1, self.layer_scale2 = scale(), scale()

    def forward(self, x):
        x = x + scaled(self.attention(self.layernorm_before(x)), self.layer_scale1)
        return x + scaled(self.output(F.gelu(self.intermediate(self.layernorm_after(x)))), self.layer_scale2)


def scaled(x, scale):
    return x if scale is None else x * scale


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embeddings = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + cfg.position_grid ** 2, cfg.hidden_size))
        self.layer = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        # [-1, 1] pixels -> the checkpoint's statistics: x * a + b (identity for google/vit)
        mean, std = torch.tensor(cfg.image_mean), torch.tensor(cfg.image_std)
        self.register_buffer("pixel_scale", (0.5 / std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_shift", ((0.5 - mean) / std).view(1, -1, 1, 1), persistent=False)

    def positions(self, h, w):
        """Position embeddings for an h x w patch grid: the learned ones, or their bicubic resize (in fp32, as
        transformers' Dinov2 does) when the checkpoint was trained on another grid."""
        pos, g = self.position_embeddings, self.config.position_grid
        if (h, w) == (g, g):
            return pos
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, pixel_values):
        """pixel_values [B,3,H,W] in [-1, 1] -> last hidden state [B, 1+N, D]."""
        if self.config.image_mean != (0.5, 0.5, 0.5) or self.config.image_std != (0.5, 0.5, 0.5):
            pixel_values = pixel_values * self.pixel_scale.to(pixel_values.dtype) \
                + self.pixel_shift.to(pixel_values.dtype)
        x = self.patch_embeddings(pixel_values)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.positions(h, w)
        for block in self.layer:
            x = block(x)
        return self.layernorm(x)


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

# -----------------------------------------------------------------------------------------------------------
# Llama (SmolLM2)


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 as the reference does; bf16 variance loses too much precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        q = split_heads(self.q_proj(x), self.n_head)
        k = split_heads(self.k_proj(x), self.n_kv)
        v = split_heads(self.v_proj(x), self.n_kv)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if isinstance(cache, tuple):  # the static decode step: (this layer's k, v buffers, column to fill)
            k_buf, v_buf, slot = cache
            k_buf.index_copy_(2, slot, k)
            v_buf.index_copy_(2, slot, v)
            k, v = k_buf, v_buf
        elif cache is not None:  # (a prompt read wider than the cache attends to the keys later tokens will see)
            k, v = (t.to(q.dtype) for t in cache.update(self.layer_idx, k, v))
        # grouped-query attention: each K/V head serves n_head / n_kv query heads
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        return self.o_proj(merge_heads(attention(q, k, v, mask=mask, causal=True)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys/values for every layer; `pos` is how many positions are filled."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        hd = cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer_idx, k, v):
        T = k.size(2)
        self.k[layer_idx, :, :, self.pos:self.pos + T] = k
        self.v[layer_idx, :, :, self.pos:self.pos + T] = v
        return self.k[layer_idx, :, :, :self.pos + T], self.v[layer_idx, :, :, :self.pos + T]


def matvec_options():
    """A CPU matrix-vector product (one row: batch-1 decoding) runs faster as the fused multiply + sum that
    inductor's "decompose_mm_pass" writes (bf16 weights converted in registers as they stream by) than as BLAS's
    bf16 gemv. Older torch releases name the pass differently or apply it on CUDA only: then no options."""
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_module
    except ImportError:
        return {}
    if not hasattr(pass_module, "CPU_MAX_FIRST_DIMENSION_DECOMPOSITION"):
        return {}
    return {"options": {"post_grad_fusion_options": {"decompose_mm_pass": {}}}}


def matvec(x, weight):
    """x @ weight.T for one row x [1, C] as a multiply + sum: the LM head in batch-1 decoding on a CPU. It is the
    largest product of a token (the 49k-word vocabulary), where BLAS's bf16 gemv streams the weights well below
    the memory's rate on some CPUs (AVX-512 BF16 ones) and inductor's fused multiply + sum near it; the decompose
    pass of matvec_options does the same for the layers' products but stops at 2048 columns."""
    return (x.float()[:, None, :] * weight.float()).sum(-1).to(weight.dtype)


DECODE_LAYERS_PER_GRAPH = 5  # the CPU decode step's layers per compiled call (see compile_decode)


def call_layers(blocks, x, cos, sin, mask, ks, vs, slot):
    """The decode step through `blocks` in turn, each with its own cache buffers: a plain function, so that
    compiled, one graph serves every group of as many identical layers (see compile_decode)."""
    for block, k, v in zip(blocks, ks, vs):
        x = block(x, cos, sin, mask, (k, v, slot))
    return x


def train_layer(block, *args):
    """The same for Llama.compile_layers; its own function, so its compiled graphs are counted apart from the
    decode step's (torch.compile keeps a limited number per function)."""
    return block(*args)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(_init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE tables computed once, indexed by position: no per-step recomputation, nothing data-dependent
        hd = cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float64), inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("rope_cos", freqs.cos().float(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin().float(), persistent=False)
        self.prompt_dtype, self.prompt_layers = None, None  # see read_prompts_in

    def read_prompts_in(self, dtype):
        """Keep a copy of the layers' weights in dtype for generate() to read prompts with: where that is wider
        than the weights (trainer.decoding_dtypes: a CPU that emulates bf16 products decodes one row at a time
        from bf16 weights, which halves the bytes streamed, but reads a prompt's many rows fastest in fp32). The
        copy costs its memory (fp32: ~425 MB for SmolLM2-135M's layers); widening each layer's weights as a
        prompt ran cost about a quarter of the first token's time instead (EXPERIMENTS.md, speed). It copies the
        weights as they are now: call it after the last change to them. None drops it."""
        self.prompt_dtype = dtype
        self.prompt_layers = None if dtype is None else [
            {k: v.detach().to(dtype) for k, v in block.named_parameters()} for block in self.model.layers]
        return self

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, wide=False):
        """Final normed hidden states [B,T,C]. attention_mask [B, past+T] (1 = real token) marks padding;
        positions count real tokens only, so left-padded batches see the same positions as single rows.
        wide: run the layers with read_prompts_in's copy of their weights, where one is kept."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        wide = wide and self.prompt_layers is not None
        x = x.to(self.prompt_dtype) if wide else x
        B, T = x.shape[:2]
        past = 0 if cache is None else cache.pos
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=x.device).expand(B, T)
            mask = None if past == 0 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        else:
            am = attention_mask.bool()
            pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            # a fully padded query row (left padding) would softmax over nothing; let it see itself
            diag = torch.zeros_like(causal)
            diag[:, past:] = torch.eye(T, dtype=torch.bool, device=x.device)
            mask = ((causal & am[:, None, :]) | diag)[:, None]
        cos = self.rope_cos[pos].unsqueeze(1).to(x.dtype)
        sin = self.rope_sin[pos].unsqueeze(1).to(x.dtype)
        run = getattr(self, "_layer", train_layer) if cache is None else train_layer
        for i, block in enumerate(self.model.layers):
            if wide:
                x = torch.func.functional_call(block, self.prompt_layers[i], (x, cos, sin, mask, cache))
            else:
                x = run(block, x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        """Logits [B,T,V]. Training code should apply lm_head only where labels exist (see train_vlm.py)."""
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds, attention_mask, cache))

    def decode_step(self, x, pos, cache, slot, mask):
        """One new token per row with static shapes (the fast decode path): x [B,1,C]; pos [B,1] its RoPE
        position; slot [1] the cache column it fills; mask [B,1,1,max_len] the columns each row may see.
        Attending over the whole buffer with the unfilled columns masked gives the same softmax as the
        growing cache: exp(-inf) adds exact zeros."""
        cos = self.rope_cos[pos].unsqueeze(1).to(x.dtype)
        sin = self.rope_sin[pos].unsqueeze(1).to(x.dtype)
        # a plain list: slicing the ModuleList would build a new Module per group, ~0.1 ms a token
        run, layers, n = getattr(self, "_decode_layers", call_layers), list(self.model.layers), DECODE_LAYERS_PER_GRAPH
        for i in range(0, len(layers), n):
            x = run(layers[i:i + n], x, cos, sin, mask, list(cache.k[i:i + n]), list(cache.v[i:i + n]), slot)
        if x.size(0) == 1 and hasattr(self, "_decode_head"):
            return self._decode_head(self.model.norm(x[:, -1]), self.lm_head.weight)
        return self.lm_head(self.model.norm(x))[:, -1]

    def compile_layers(self):
        """torch.compile the layers' forward (and with it their backward) for full sequences, as training runs
        them: one graph serves the 30 identical layers, so it compiles in seconds on a CPU where the whole model
        takes minutes, and it fuses what eager mode runs as many small kernels (norms, RoPE, SiLU, casts)."""
        self._layer = torch.compile(train_layer)
        return self

    def compile_decode(self):
        """torch.compile the decode step for the device the weights are on. On a GPU the full step as one graph,
        replayed as one CUDA graph per token (mode='reduce-overhead': launches are what limits batch-1 decoding
        there); on a CPU a few layers at a time: one graph serves every group of DECODE_LAYERS_PER_GRAPH identical
        layers, so it compiles in seconds where the whole step takes minutes. Fewer, larger calls make a batch-1
        token faster (each call costs Dynamo's checks and a wrapper, and a graph ends in buffers), more layers a
        graph a longer compile: five is the measured compromise (EXPERIMENTS.md, speed). And for one row the LM
        head (see matvec)."""
        if self.lm_head.weight.is_cuda:
            self._decode = torch.compile(self.decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            self._decode_layers = torch.compile(call_layers, fullgraph=True, dynamic=False, **matvec_options())
            self._decode_head = torch.compile(matvec, fullgraph=True, dynamic=False)
        return self

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens=64,
                 temperature=0.0, top_k=0, top_p=1.0, eos_token_id=2, generator=None, use_cache=True,
                 on_token=None, fast=False):
        """Decode up to max_new_tokens after a (left-padded) prompt; each row stops at eos_token_id.
        fast: after the prompt, run decode_step (static shapes; compiled if compile_decode() was called).
        Returns new token ids [B, n] (rows that finished early are padded with eos_token_id)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        am = torch.ones(B, T, dtype=torch.long, device=x.device) if attention_mask is None else attention_mask
        S = T + max_new_tokens
        cache = KVCache(self.config, B, S, x.device, x.dtype) if use_cache and not fast else None
        if fast:
            step = getattr(self, "_decode", self.decode_step)
            # one cache per shape, kept between calls: a replayed CUDA graph writes to fixed addresses
            cache = getattr(self, "_static_cache", None)
            if cache is None or cache.k.shape[1] != B or cache.k.shape[3] != S or cache.k.dtype != x.dtype \
                    or cache.k.device != x.device:
                cache = self._static_cache = KVCache(self.config, B, S, x.device, x.dtype)
                if x.is_cuda:
                    torch._dynamo.mark_static_address(cache.k)
                    torch._dynamo.mark_static_address(cache.v)
            cache.pos = 0
            seen = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=x.device)
            seen[:, 0, 0, :T] = am.bool()
            pos = am.sum(-1, keepdim=True) - 1  # position of the last prompt token (left padding skipped)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        out, step_in = [], x
        for i in range(max_new_tokens):
            if fast and i > 0:
                seen[:, 0, 0, T + i - 1] = True
                pos = pos + 1
                logits = step(step_in, pos, cache, torch.tensor([T + i - 1], device=x.device), seen)
            else:  # the prompt (or, without a cache, everything so far): the LM head on the last position only
                h = self.hidden_states(inputs_embeds=step_in if use_cache or fast else x, attention_mask=am,
                                       cache=cache, wide=i == 0)
                logits = self.lm_head(h[:, -1].to(self.lm_head.weight.dtype))
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
            step_in = self.model.embed_tokens(nxt)[:, None].to(x.dtype)
            if not fast:
                x = torch.cat([x, step_in], dim=1)
                am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype, device=am.device)], dim=1)
        return torch.stack(out, dim=1)


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits [B,V] -> token ids [B]. temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
