"""
How fast is the core? Training steps and decoding at the recipe's full sizes: ViT-B/16 at 224, a bert-base
Q-Former with 32 queries, SmolLM2-135M with LoRA r=8 on q/k/v/o. Weights are random (speed does not depend on
their values), so this runs offline.

    python bench.py                        # ours
    python bench.py --baseline             # and the same workloads built from transformers + peft
    python bench.py --baseline --json      # one JSON object (stage1_itc_samples_per_s, baseline_..., ratios)
    python bench.py --only decode          # a subset: stage1_itc, stage1_all, stage2, decode

With --baseline both sides are built in one process and timed in alternating rounds (the median round counts),
so a noisy neighbour or a clock change hits both. The baseline is what a user would write instead: transformers'
BLIP-2 retrieval model (ITC), vision and Q-Former models, LlamaForCausalLM with peft's LoRA, SDPA attention and
`generate`, run in every set-up that makes sense on the device (training: fp32, bf16 autocast; decoding: fp32
weights, with bf16 autocast, bf16 weights), and ours is divided by the fastest of them, which is named.
"""
import copy
import json
import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import apply_lora
from model import Llama, LlamaConfig, ViT, ViTConfig
from qformer import QFormer, QFormerConfig
from train_qformer import Stage1
from train_vlm import VLM
from trainer import Env, compiled, cpu_info, decoding_dtypes, freeze_to, make_optimizer, parse_config

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from the vendors' data sheets


@dataclass
class BenchConfig:
    """Throughput of stage 1, stage 2 and decoding; 0 = a default that suits the device (GPU / CPU)."""
    device: str = "auto"
    dtype: str = "auto"              # ours, training: measured per device (trainer.fastest_dtype)
    decode_dtype: str = "auto"       # ours, decoding: measured per device, as sample.py chooses it
    baseline: bool = False
    baseline_dtypes: str = "auto"    # the baseline's set-ups are built from these: fp32,bf16 on a CPU, bf16 on a GPU
    compile: str = "auto"            # torch.compile ours: auto = training on a GPU the whole step, on a CPU layer
                                     # by layer (as --compile does in training); decoding: the decode step
    only: str = ""                   # comma list of stage1_itc, stage1_all, stage2, decode
    stage1_batch: int = 0            # 128 / 2
    stage2_batch: int = 0            # 64 / 2
    decode_batch: int = 0            # 64 / 4 (batch 1 is always measured)
    steps: int = 0                   # timed steps per round: 10 / 1
    warmup: int = 0                  # untimed steps first (compilation, autotuning): 3 / 1
    rounds: int = 0                  # alternating timed rounds per side: 3 / 2
    text_len: int = 32               # stage 1 caption tokens
    prompt_len: int = 24             # stage 2: tokens before the image + 32 image embeddings + caption = 80
    caption_len: int = 24
    new_tokens: int = 0              # decoding: 128 / 24, after an 80-token prompt
    peak_tflops: float = 0.0         # for MFU; 0 = the data-sheet bf16 figure when the GPU is known
    json: bool = False


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(fn, steps, dev):
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / steps


class Side:
    """One side of a comparison: a step function, plus the memory its own warm-up needed (GPU)."""

    def __init__(self, build, dev, warmup):
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.step = build()
        for _ in range(warmup):  # compile, autotune, allocator warm-up
            self.step()
        sync(dev)
        self.peak_gb = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else None
        self.times = []


def race(sides, cfg, dev, steps=None):
    """Alternate timed rounds between the sides; -> median seconds per step, per side."""
    for _ in range(cfg.rounds):
        for s in sides:
            s.times.append(seconds_per_step(s.step, steps or cfg.steps, dev))
    return [statistics.median(s.times) for s in sides]

# -----------------------------------------------------------------------------------------------------------
# the workloads, ours


def random_inputs(B, dev, text_len=None, seq=None):
    g = torch.Generator().manual_seed(0)
    out = {"pixel_values": torch.randn(B, 3, 224, 224, generator=g).to(dev)}
    if text_len:
        out["input_ids"] = torch.randint(1000, 30000, (B, text_len), generator=g).to(dev)
        out["attention_mask"] = torch.ones(B, text_len, dtype=torch.long, device=dev)
        out["key_ids"] = torch.arange(B, device=dev)
    return out


def ours_stage1(cfg, env, B, losses, compile_):
    def build():
        model = Stage1(ViT(ViTConfig()), QFormer(QFormerConfig(hidden_dropout_prob=0.0))).to(env.device)
        freeze_to(model.vit, env.dtype)  # as train_qformer.py runs it
        opt = make_optimizer(model.qformer.parameters(), 1e-4, 0.05, env.device)
        fwd = compiled(model, [model.qformer], env.device) if compile_ else model
        batch, gen = random_inputs(B, env.device, cfg.text_len), torch.Generator().manual_seed(0)

        def step():
            with env.autocast():
                loss = sum(fwd(batch, losses, None, gen).values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return build


def stage2_batch(cfg, B, dev):
    T = cfg.prompt_len + 32 + cfg.caption_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 49000, (B, T), generator=g)
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    image_mask[:, cfg.prompt_len:cfg.prompt_len + 32] = True
    targets = torch.full((B, T), -100)
    targets[:, -cfg.caption_len - 1:-1] = ids[:, -cfg.caption_len:]  # targets[t] = the token at t + 1
    return {"pixel_values": torch.randn(B, 3, 224, 224, generator=g).to(dev), "lm_ids": ids.to(dev),
            "image_mask": image_mask.to(dev), "targets": targets.to(dev)}


def ours_stage2(cfg, env, B, compile_):
    def build():
        llm = Llama(LlamaConfig())
        apply_lora(llm, r=8, alpha=16, targets=LORA_TARGETS)
        vlm = VLM(ViT(ViTConfig()).requires_grad_(False), QFormer(QFormerConfig(hidden_dropout_prob=0.0)), llm,
                  None).to(env.device)
        for frozen in (vlm.vit, vlm.llm):  # as train_vlm.py runs them
            freeze_to(frozen, env.dtype)
        scale = {p: 0.1 for p in vlm.qformer.parameters()}  # the recipe: the Q-Former trains on at lr x 0.1
        opt = make_optimizer([p for p in vlm.parameters() if p.requires_grad], 1e-4, 0.0, env.device, scale)
        fwd = compiled(vlm, [vlm.qformer, vlm.llm], env.device) if compile_ else vlm
        batch = stage2_batch(cfg, B, env.device)

        def step():
            with env.autocast():
                loss = fwd(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return build

# -----------------------------------------------------------------------------------------------------------
# the same workloads from transformers + peft; AdamW fused on every device, as transformers' Trainer runs it by
# default with torch >= 2.8 (optim="adamw_torch_fused"), and as make_optimizer runs ours


def hf_autocast(dev, dtype):
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)


def hf_vision_qformer_configs():
    from transformers import Blip2QFormerConfig, Blip2VisionConfig
    vision = Blip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16, qkv_bias=True)
    qformer = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, encoder_hidden_size=768, cross_attention_frequency=2,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return vision, qformer


def hf_llama_config():
    from transformers import LlamaConfig as HFLlamaConfig
    c = LlamaConfig()
    return HFLlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                         tie_word_embeddings=True, attn_implementation="sdpa")


def hf_stage1_itc(cfg, env, B, dtype):
    def build():
        from transformers import Blip2Config, Blip2ForImageTextRetrieval
        vision, qformer = hf_vision_qformer_configs()
        qformer.use_qformer_text_input = True  # the text path ITC needs
        config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=32)
        config._attn_implementation = "sdpa"
        model = Blip2ForImageTextRetrieval(config).to(env.device)
        model.vision_model.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        batch = random_inputs(B, env.device, cfg.text_len)
        target = torch.arange(B, device=env.device)

        def step():
            with hf_autocast(env.device, dtype):
                out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"], use_image_text_matching_head=False)
                sim = out.logits_per_image.float() / 0.07
                loss = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return build


def hf_stage2(cfg, env, B, dtype):
    def build():
        from peft import LoraConfig, get_peft_model
        from transformers import Blip2QFormerModel, Blip2VisionModel, LlamaForCausalLM
        vision_cfg, qformer_cfg = hf_vision_qformer_configs()
        vision_cfg._attn_implementation = "sdpa"
        vision = Blip2VisionModel(vision_cfg).to(env.device).requires_grad_(False)
        qformer = Blip2QFormerModel(qformer_cfg).to(env.device)
        query_tokens = nn.Parameter(torch.zeros(1, 32, 768, device=env.device))
        proj = nn.Sequential(nn.Linear(768, 576), nn.GELU(), nn.Linear(576, 576)).to(env.device)
        lm = get_peft_model(LlamaForCausalLM(hf_llama_config()).to(env.device),
                            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS.split(",")))
        opt = torch.optim.AdamW([{"params": list(qformer.parameters()) + [query_tokens], "lr": 1e-5},
                                 {"params": [p for p in lm.parameters() if p.requires_grad] + list(proj.parameters())}],
                                lr=1e-4, fused=True)
        batch = stage2_batch(cfg, B, env.device)
        labels = batch["lm_ids"].masked_fill(batch["targets"].roll(1, dims=1) == -100, -100)  # HF shifts itself

        def step():
            with hf_autocast(env.device, dtype):
                with torch.no_grad():
                    feats = vision(pixel_values=batch["pixel_values"]).last_hidden_state
                q = qformer(query_embeds=query_tokens.expand(B, -1, -1), encoder_hidden_states=feats).last_hidden_state
                emb = lm.get_input_embeddings()(batch["lm_ids"])
                emb = emb.masked_scatter(batch["image_mask"][..., None], proj(q).to(emb.dtype))
                loss = lm(inputs_embeds=emb, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return build

# -----------------------------------------------------------------------------------------------------------
# FLOPs (for MFU), counted as the work the step needs: frozen layers still pay for the activation gradients


def linear_flops(tokens, *shapes):
    return sum(2 * tokens * i * o for i, o in shapes)


def stage2_flops_per_sample(cfg):
    vit, qf, lm = ViTConfig(), QFormerConfig(), LlamaConfig()
    n, d, ff = 197, vit.hidden_size, vit.intermediate_size
    f_vit = vit.num_hidden_layers * (linear_flops(n, (d, d), (d, d), (d, d), (d, d), (d, ff), (ff, d)) + 4 * n * n * d)
    f_vit += linear_flops(196, (3 * 16 * 16, d))
    q, h = 32, qf.hidden_size
    f_q = qf.num_hidden_layers * (linear_flops(q, (h, h), (h, h), (h, h), (h, h), (h, 3072), (3072, h)) + 4 * q * q * h)
    n_cross = qf.num_hidden_layers // qf.cross_attention_freq
    f_q += n_cross * (linear_flops(q, (h, h), (h, h)) + linear_flops(n, (d, h), (d, h)) + 4 * q * n * h)
    f_q += linear_flops(q, (h, lm.hidden_size), (lm.hidden_size, lm.hidden_size))  # projector
    T, C, kv = cfg.prompt_len + 32 + cfg.caption_len, lm.hidden_size, lm.hidden_size // lm.num_attention_heads * 3
    per_layer = linear_flops(T, (C, C), (C, kv), (C, kv), (C, C), (C, lm.intermediate_size),
                             (C, lm.intermediate_size), (lm.intermediate_size, C))
    attn = 4 * T * T * C // 2  # causal: half the score matrix
    lora = linear_flops(T, (C, 8), (8, C), (C, 8), (8, kv), (C, 8), (8, kv), (C, 8), (8, C))
    f_lm = lm.num_hidden_layers * (2 * (per_layer + attn) + 3 * lora)  # forward + activation grads; LoRA: + wgrad
    f_lm += 2 * linear_flops(cfg.caption_len, (C, lm.vocab_size))  # the head, on caption tokens only
    return f_vit + 3 * f_q + f_lm


def peak_flops(cfg, dev):
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, tf in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return None

# -----------------------------------------------------------------------------------------------------------
# decoding


def bench_decode(cfg, env, results, compile_, base_dtypes):
    dev, N, T = env.device, cfg.new_tokens, cfg.prompt_len + 32 + cfg.caption_len
    dt, prompt_dt = decoding_dtypes(dev, cfg.decode_dtype, compiled=compile_)
    ours = Llama(LlamaConfig()).to(dev, dt).eval()
    ours.read_prompts_in(prompt_dt)  # as sample.py decodes
    if compile_:  # on CUDA: the whole step as one CUDA graph; on a CPU: five layers a graph (seconds to compile)
        ours.compile_decode()
    setups = {}  # the baseline's set-ups: name -> (model, autocast dtype)
    if cfg.baseline:
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM(hf_llama_config()).to(dev).eval()
        hf.load_state_dict(ours.state_dict(), strict=False)  # same weights (RoPE tables are not in the state)
        hf_half = None
        for bdt in base_dtypes:
            if dev.type == "cpu":  # transformers' default on a CPU: fp32 weights, autocast as a user turns it on
                setups["fp32 weights" + (f", {name_of(bdt)} autocast" if bdt != torch.float32 else "")] = (hf, bdt)
            if bdt != torch.float32:  # half-width weights, as users load them on a GPU (dtype=torch.bfloat16)
                hf_half = hf_half or copy.deepcopy(hf).to(bdt)
                setups[f"{name_of(bdt)} weights"] = (hf_half, torch.float32)
    for B in (1, cfg.decode_batch):
        ids = torch.randint(10, 49000, (B, T), generator=torch.Generator().manual_seed(B)).to(dev)

        def run_ours(stamp):
            ours.generate(input_ids=ids, max_new_tokens=N, eos_token_id=-1, fast=True, on_token=lambda t: stamp())

        def run_hf(stamp, model, autocast_dt):
            class Streamer:  # generate() calls put() with the prompt, then once per new token
                def put(self, value):
                    stamp()

                def end(self):
                    pass
            with hf_autocast(dev, autocast_dt):
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                               do_sample=False, pad_token_id=0, streamer=Streamer())
        sides = [("ours", run_ours, 0)] + [(name, lambda s, m=m, a=a: run_hf(s, m, a), 1)
                                            for name, (m, a) in setups.items()]
        ttft, rate = {n: [] for n, _, _ in sides}, {n: [] for n, _, _ in sides}
        for r in range(1 + cfg.rounds):  # round 0 is warm-up: compilation, CUDA graphs, allocator
            for name, run, skip in sides:
                # each token is timed as it comes out (a sync per token, as a streaming user sees it):
                # time to first token, then the steady rate between the first and the last token
                stamps = []
                def stamp():
                    sync(dev)
                    stamps.append(time.perf_counter())
                t0 = time.perf_counter()
                run(stamp)
                stamps = stamps[skip:]
                if r > 0:
                    ttft[name].append(stamps[0] - t0)
                    rate[name].append(B * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        results[f"decode_b{B}_ttft_ms"] = statistics.median(ttft["ours"]) * 1e3
        results[f"decode_b{B}_tokens_per_s"] = statistics.median(rate["ours"])
        if setups:  # the baseline at its best, for each figure on its own
            by_rate = {n: statistics.median(rate[n]) for n in setups}
            by_ttft = {n: statistics.median(ttft[n]) * 1e3 for n in setups}
            best, first = max(by_rate, key=by_rate.get), min(by_ttft, key=by_ttft.get)
            results[f"baseline_decode_b{B}_tokens_per_s"] = by_rate[best]
            results[f"baseline_decode_b{B}_tokens_per_s_setup"] = best
            results[f"baseline_decode_b{B}_ttft_ms"] = by_ttft[first]
            results[f"baseline_decode_b{B}_ttft_ms_setup"] = first
            results[f"ratio_decode_b{B}_ttft"] = by_ttft[first] / results[f"decode_b{B}_ttft_ms"]  # > 1: ours sooner
            results[f"baseline_decode_b{B}_all"] = {n: {"tokens_per_s": round(by_rate[n], 2),
                                                        "ttft_ms": round(by_ttft[n], 1)} for n in setups}
    results["decode_dtype"] = name_of(dt)
    results["decode_prompt_dtype"] = name_of(prompt_dt or dt)


def name_of(dt):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))

# -----------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(BenchConfig, argv=argv)
    env = Env(cfg.device, cfg.dtype)
    dev, gpu = env.device, env.device.type == "cuda"
    for name, gpu_v, cpu_v in [("stage1_batch", 128, 2), ("stage2_batch", 64, 2), ("decode_batch", 64, 4),
                               ("steps", 10, 1), ("warmup", 3, 1), ("rounds", 3, 2), ("new_tokens", 128, 24)]:
        if not getattr(cfg, name):
            setattr(cfg, name, gpu_v if gpu else cpu_v)
    if cfg.baseline_dtypes == "auto":
        cfg.baseline_dtypes = "bfloat16" if gpu else "float32,bfloat16"
    base_dts = [getattr(torch, d) for d in cfg.baseline_dtypes.split(",")]
    compile_ = cfg.compile in ("auto", "1", "true", "yes", "on")
    only = set(cfg.only.split(",")) if cfg.only else {"stage1_itc", "stage1_all", "stage2", "decode"}
    name = torch.cuda.get_device_name(dev) if gpu else f"{cpu_info()['cpu']} ({torch.get_num_threads()} threads)"
    log = (lambda *a: None) if cfg.json else print
    # on a CPU its flags, and the vector ISA ATen's kernels run (ATEN_CPU_CAPABILITY can set it below the flags)
    cpu = {} if gpu else {"cpu_flags": " ".join(cpu_info()["cpu_flags"]),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    results = {"device": name, **cpu,
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "dtype": name_of(env.dtype),
               "baseline_dtypes": cfg.baseline_dtypes, "compile": compile_}
    where = f", flags {cpu['cpu_flags']}, kernels {cpu['cpu_capability']}" if cpu else ""
    log(f"device {name}{where}; ours: training {name_of(env.dtype)} (compile {compile_}); baseline: "
        + (f"the best of {cfg.baseline_dtypes}" if cfg.baseline else "off"))

    def show(wanted):  # one line of the results gathered so far whose keys are wanted
        log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()
                       if wanted(k) and not isinstance(v, dict)))

    def compare(key, per_step_samples, ours_build, base_builds, flops=None):
        """base_builds: {set-up name: build}; the fastest set-up is the baseline."""
        torch._dynamo.reset()  # each workload gets torch.compile's whole budget of graphs (as one training run)
        names = ["ours"] + (list(base_builds) if cfg.baseline else [])
        builds = [ours_build] + [base_builds[n] for n in names[1:]]
        sides = [Side(b, dev, cfg.warmup) for b in builds]
        rates = dict(zip(names, (per_step_samples / t for t in race(sides, cfg, dev))))
        results[f"{key}_samples_per_s"] = rates["ours"]
        if sides[0].peak_gb is not None:
            results[f"{key}_peak_mem_gb"] = sides[0].peak_gb
        if len(names) > 1:
            best = max(names[1:], key=rates.get)
            results[f"baseline_{key}_samples_per_s"] = rates[best]
            results[f"baseline_{key}_samples_per_s_setup"] = best
            if sides[names.index(best)].peak_gb is not None:
                results[f"baseline_{key}_peak_mem_gb"] = sides[names.index(best)].peak_gb
            results[f"baseline_{key}_all"] = {n: round(rates[n], 3) for n in names[1:]}
        if flops and peak_flops(cfg, dev):
            results[f"{key}_mfu"] = flops * results[f"{key}_samples_per_s"] / peak_flops(cfg, dev)
        show(lambda k: k.startswith((key, "baseline_" + key)))

    def autocast_setups(make):  # the training set-ups: fp32, or autocast to a half-width dtype
        return {("fp32" if dt == torch.float32 else f"{name_of(dt)} autocast"): make(dt) for dt in base_dts}

    B1, B2 = cfg.stage1_batch, cfg.stage2_batch
    if "stage1_itc" in only:
        compare("stage1_itc", B1, ours_stage1(cfg, env, B1, ["itc"], compile_),
                autocast_setups(lambda dt: hf_stage1_itc(cfg, env, B1, dt)))
    if "stage1_all" in only:  # transformers has no trainable ITG for BLIP-2's Q-Former: no baseline here
        compare("stage1_all", B1, ours_stage1(cfg, env, B1, ["itc", "itm", "itg"], compile_), {})
    if "stage2" in only:
        T = cfg.prompt_len + 32 + cfg.caption_len
        compare("stage2", B2, ours_stage2(cfg, env, B2, compile_),
                autocast_setups(lambda dt: hf_stage2(cfg, env, B2, dt)), stage2_flops_per_sample(cfg))
        results["stage2_tokens_per_s"] = results["stage2_samples_per_s"] * T
    if "decode" in only:
        bench_decode(cfg, env, results, compile_, base_dts)
        show(lambda k: "decode" in k)
    for k in [k for k in results if k.startswith("baseline_") and k.endswith("_per_s")]:
        ours_key = k[len("baseline_"):]
        results[f"ratio_{ours_key}"] = results[ours_key] / results[k]
    if not gpu:
        results["cpu_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if cfg.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))
    else:
        for k, v in results.items():
            if k.startswith("ratio_"):
                what = k[len("ratio_"):]
                setup = results.get(f"baseline_{what}_setup") or results.get(f"baseline_{what}_ms_setup", "")
                ours = results["dtype"]
                if "decode" in what:
                    ours, prompt = results["decode_dtype"], results["decode_prompt_dtype"]
                    ours += f", prompt {prompt}" if prompt != ours else ""
                print(f"{what}: ours ({ours}) / "
                      f"baseline at its best ({setup}) = {v:.2f}x" + (" (time to first token: >1 = ours sooner)"
                                                                     if "ttft" in what else ""))
    return results


if __name__ == "__main__":
    main()
