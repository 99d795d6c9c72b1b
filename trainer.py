"""
The training machinery both stages share: config dataclass -> argparse flags (with presets), device / dtype /
DDP set-up, the warm-up + cosine schedule, the step loop with gradient accumulation and autocast, atomic
checkpoints with full optimizer/RNG state for exact resume, and plain logs (one line per interval, metrics.jsonl).
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import random
import sys
import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # all_gather with gradients (contrastive losses under DDP)
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------------------------------------
# config: every dataclass field is a --flag; a preset changes the defaults, explicit flags still win


@dataclasses.dataclass
class TrainConfig:
    """What both stages share: data, the loop, logging, the machine. Each stage's config extends it."""
    preset: str = ""
    out_dir: str = "out/run"
    resume: bool = False
    # data
    data: str = "cc3m"          # cc3m / cc12m / hub:org/name (WebDataset shards from the hub), shapes, real
                                # (stamps + Fashion-MNIST), 'dir/*.tar' shards, or a folder with captions.jsonl
    n_pairs: int = 50_000       # hub data: how many training pairs to fetch and use (0: all)
    n_train: int = 200_000      # shapes, real: size of the training set (an epoch)
    val_data: str = ""          # default: held out from --data
    num_workers: int = 4
    # optimisation
    batch_size: int = 64
    grad_accum: int = 1
    max_steps: int = 10_000
    halt_at: int = 0            # stop (with a checkpoint) at this step as if killed; the schedule still ends at max_steps
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # evaluation and logging
    eval_interval: int = 1000
    eval_samples: int = 1000
    log_interval: int = 20
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False  # torch.compile: on a GPU the whole step, on a CPU the trained parts layer by layer
    seed: int = 1337


def parse_config(cls, presets=None, argv=None):
    presets = presets or {}
    p = argparse.ArgumentParser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=typ, default=default,
                           choices=sorted(presets) if f.name == "preset" and presets else None)
    known, _ = p.parse_known_args(argv)
    if getattr(known, "preset", ""):
        p.set_defaults(**presets[known.preset])  # a preset only moves defaults: explicit flags still win
    return cls(**vars(p.parse_args(argv)))

# -----------------------------------------------------------------------------------------------------------
# device, precision, processes


def keep_freed_memory():
    """Stop glibc from handing freed blocks back to the OS: blocks above its mmap threshold are unmapped when freed
    and the heap's free top is trimmed, so a CPU training step, which frees and re-allocates its activations and
    gradients every step, page-faults (and the kernel zeroes) tens of MB of them again each time. Kept, they are
    reused: the process holds its peak instead of shrinking between steps. Linux with glibc only; elsewhere (or
    where mallopt refuses) nothing changes. Returns whether both settings took."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from malloc.h
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; larger blocks are still mapped afresh
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) & bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


class Env:
    """Where this process runs: device, autocast dtype, and its place among DDP processes (torchrun)."""

    def __init__(self, device="auto", dtype="auto", seed=1337):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.device.type == "cpu":
            keep_freed_memory()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if dtype == "auto":
            dtype = fastest_dtype(self.device, "train")
        self.dtype = getattr(torch, dtype)
        self.is_main = self.rank == 0
        torch.manual_seed(seed + self.rank)
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sizes(self, n):
        """Every process's local batch size: they differ when a process skipped an unreadable sample or its
        stream ran out first."""
        if self.world == 1:
            return [n]
        t = torch.tensor([n], device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [int(x) for x in out]

    def gather(self, x, sizes=None):
        """Concatenate x from every process along dim 0, keeping gradients (for contrastive losses). The local
        batches may differ in size (see sizes): each is padded to the largest for the collective, then trimmed."""
        if self.world == 1:
            return x
        sizes = sizes or self.sizes(x.size(0))
        padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.size(0)))
        parts = torch.distributed.nn.functional.all_gather(padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    def gather_nograd(self, x, sizes=None):
        """All processes' x, concatenated along dim 0 (no gradient). Dim 0 may differ between processes (see
        sizes), and so may dim 1 (text lengths): both are zero-padded to the largest first."""
        if self.world == 1:
            return x
        sizes = sizes or self.sizes(x.size(0))
        if x.dim() > 1:
            n = torch.tensor([x.size(1)], device=x.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, int(n) - x.size(1)))
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.size(0)))
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat([p[:n] for p, n in zip(out, sizes)], dim=0)

    def gather_object(self, obj):
        """[obj of process 0, obj of process 1, ...] (any picklable object)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, x):
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def print(self, *a, **k):
        if self.is_main:
            print(*a, **k, flush=True)


def cpu_info():
    """The CPU's model name and the flags that decide its fastest dtype (for dtype choices and bench reports)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if name != "unknown CPU" and flags:
                    break
    except OSError:  # not Linux
        import platform
        name = platform.processor() or name
    return {"cpu": name, "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


# What each workload multiplies: the LM's linear shapes (in, out), and per workload its passes as (rows, times).
# Training (a stage-2 batch's rows, forward + backward) is compute-bound. Decoding, after the prompt, writes a reply
# one row at a time: each pass streams every weight from memory, so half-width weights can win even where bf16
# products are emulated. The prompt's many rows are bound by products, like training, and where training's are
# faster in fp32 they are read from an fp32 copy (decoding_dtypes), so the decoding probes time one-row passes
# only. Those run two ways: eager, through BLAS's gemv, and in the compiled decode step as fused multiply + sums
# (model.matvec and the decompose pass), which widen bf16 weights in registers; BLAS's bf16 gemv is slow on some
# CPUs where the fused one is fast, so each is measured on its own. 8 layers' weights (57 MB in bf16) are more
# than a CPU's caches hold, as the LM's 30 are.
LM_LINEARS = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # q|k|v, o, gate|up, down
PROBES = {"train": ([(160, 1)], 2),  # ([(rows, times)], layers)
          "decode": ([(1, 16)], 8), "decode_compiled": ([(1, 16)], 8)}
PROBE_VERSION = 3  # in the cache key: an answer measured by another probe is measured again


def probe(workload, dt, reps=3):
    """Seconds for one run of `workload` (the best of reps) with frozen weights stored in dt, as freeze_to
    stores them, and activations under autocast to dt, as the training and decoding code run them; the
    "_compiled" workload through torch.compile (compiled once per dtype: seconds)."""
    passes, layers = PROBES[workload]
    train = workload == "train"
    ws = [torch.randn(o, i).to(dt) for _ in range(layers) for i, o in LM_LINEARS]
    xs = {rows: [torch.randn(rows, w.shape[1], requires_grad=train) for w in ws] for rows, _ in passes}
    if workload.endswith("_compiled"):
        xs = {rows: [x.to(dt) for x in row] for rows, row in xs.items()}
        from model import matvec  # the compiled decode step's one-row product
        products = torch.compile(lambda xs, ws: [matvec(x, w) for x, w in zip(xs, ws)], dynamic=False)
    else:
        products = lambda xs, ws: [F.linear(x, w) for x, w in zip(xs, ws)]  # noqa: E731
    times = []
    for _ in range(1 + reps):  # the first run is untimed: compilation, allocator, kernel selection
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32), torch.set_grad_enabled(train):
            for rows, n in passes:
                for _ in range(n):
                    out = sum(y.float().sum() for y in products(xs[rows], ws))
                    if train:
                        out.backward()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def fastest_dtype(device, workload="train"):
    """bf16 on GPUs. On a CPU it depends on the CPU: without bf16 units bf16 products are emulated (several
    times slower than fp32 for training); with them they are ~2x faster on some CPUs and slower on others (a
    Xeon with avx512_bf16 but no AMX); memory-bound one-row decoding may gain from half-width weights either way.
    So it is measured, per workload, at the LM's shapes (PROBES), once per machine: the answer is kept in
    $XDG_CACHE_HOME/tinyblip/dtypes.json under the CPU, torch, thread count and probe version."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    info = cpu_info()
    key = (f"{info['cpu']} [{' '.join(info['cpu_flags'])}] torch {torch.__version__}, {torch.get_num_threads()} "
           f"threads, probes v{PROBE_VERSION}")
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "tinyblip", "dtypes.json")
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if workload not in known.get(key, {}):
        times = {str(dt).replace("torch.", ""): probe(workload, dt) for dt in (torch.float32, torch.bfloat16)}
        known.setdefault(key, {})[workload] = min(times, key=times.get)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_text(path, json.dumps(known, indent=1))
        except OSError:  # a read-only home: measure again next time
            pass
    return known[key][workload]


def decoding_dtypes(device, weights="auto", compiled=False):
    """(the LM's weights, a prompt's products: None = the weights' dtype) for decoding on device. The weights: the
    dtype `weights` names (sample.py --dtype), or with "auto" the one that one-row passes measure fastest, eager or
    in the compiled decode step (`compiled`: sample.py --compile, bench.py). A prompt is many rows at once, bound
    by products like training, not by streaming weights: where the training probe finds fp32 products faster (a
    CPU without bf16 units emulates bf16 products) and the weights are narrower, it is read in fp32, from a copy
    of the layers kept for it (Llama.read_prompts_in)."""
    workload = "decode_compiled" if compiled else "decode"
    weights = getattr(torch, fastest_dtype(device, workload) if weights == "auto" else weights)
    products = getattr(torch, fastest_dtype(device, "train"))
    return weights, (torch.float32 if products == torch.float32 and weights != torch.float32 else None)


def freeze_to(module, dtype):
    """Store the frozen weights of module's matmuls (nn.Linear, nn.Conv2d) in dtype, the autocast dtype.
    Autocast rounds them to it at every call anyway, and a frozen weight's copy is not cached (autocast caches
    only leaves that need grad), so each step would copy every frozen weight: with them stored in dtype the
    products are the same bits and the copies are gone. Embeddings, norms and positions stay in fp32, so the
    residual stream keeps its precision; a Linear that shares its weight with an embedding (the tied LM head)
    gets its own copy."""
    if dtype == torch.float32:
        return module
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.requires_grad:
            if id(m.weight) in embeddings:
                m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
            else:
                m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None and not m.bias.requires_grad:
                m.bias.data = m.bias.data.to(dtype)
    return module


def compiled(model, parts, device):
    """What --compile does in training: on a GPU torch.compile the whole step; on a CPU compile the trained
    `parts` layer by layer (compile_layers: seconds to compile, not minutes; EXPERIMENTS.md, speed).
    Returns what to call for the forward pass."""
    if device.type == "cuda":
        return torch.compile(model)
    for part in parts:
        part.compile_layers()
    return model


def lr_at(step, max_steps, lr, min_lr, warmup):
    """Linear warm-up, then cosine from lr down to min_lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def make_optimizer(params, lr, weight_decay, device, lr_scale=None):
    """AdamW; weight decay only on >=2-D weights (not biases, norms, temperatures). lr_scale: {param: factor}."""
    lr_scale = lr_scale or {}
    groups = {}
    for p in params:
        if p.requires_grad:
            key = (p.dim() >= 2, lr_scale.get(p, 1.0))
            groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
                    for (decay, scale), ps in groups.items()]
    # one fused kernel instead of a Python loop over tensors: for the shapes preset's 23M parameters on the 2-core
    # CPU the loop took 0.14 s per step (a batch-64 step took 1.6 s), the fused kernel 0.025 s
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.98), fused=fused)

# -----------------------------------------------------------------------------------------------------------
# checkpoints: train_state.pt holds all a resume needs (weights, optimizer, step, every process's RNG) in one
# file that is replaced atomically, so a run killed at any moment resumes from its last complete checkpoint;
# model.safetensors (the same weights, for users and the next stage) follows, stamped with the step and run id


class CheckpointError(Exception):
    pass


def atomic_write(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # on disk before it takes the name: a crash never publishes a short file
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def save_weights(path, state_dict, metadata=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(out_dir, weights, optimizer, step, extra, rng):
    """extra: {"run": id, "best": score, ...}; rng: one rng_state() per process."""
    os.makedirs(out_dir, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    state = {"model": weights, "optimizer": optimizer.state_dict(), "step": step, "extra": extra, "rng": rng}
    atomic_write(os.path.join(out_dir, "train_state.pt"), lambda tmp: torch.save(state, tmp))
    save_weights(os.path.join(out_dir, "model.safetensors"), weights, {"step": str(step), "run": extra["run"]})


def load_checkpoint(out_dir, optimizer, rank=0):
    """-> (weights dict, step, extra), or None when out_dir has no checkpoint; restores the optimizer and this
    process's RNG state in place. Refuses a folder whose files do not belong together."""
    path, weights_path = os.path.join(out_dir, "train_state.pt"), os.path.join(out_dir, "model.safetensors")
    for stale in glob.glob(os.path.join(out_dir, "*.tmp[0-9]*")):  # from a write that was killed
        os.remove(stale)
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=False)
    step, extra = state["step"], state["extra"]
    if "model" not in state or "run" not in extra:
        raise CheckpointError(f"{path} was written by an older version of this code; it cannot be resumed")
    if os.path.exists(weights_path):
        with safe_open(weights_path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("run") != extra["run"] or int(meta.get("step", -1)) > step:
            raise CheckpointError(
                f"{out_dir}: model.safetensors (run {meta.get('run')}, step {meta.get('step')}) and train_state.pt "
                f"(run {extra['run']}, step {step}) do not belong together: copied from another run or step? Resume "
                "from a folder this code wrote, or start afresh without --resume")
    if not os.path.exists(weights_path) or int(meta["step"]) < step:  # a save stopped between its two files
        save_weights(weights_path, state["model"], {"step": str(step), "run": extra["run"]})
    optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["model"], step, extra


# -----------------------------------------------------------------------------------------------------------
# the loop


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_metrics(out_dir, record):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def resume(cfg, env, optimizer):
    """(weights or None, start step, extra) for a run: with --resume, from the checkpoint in out_dir (the
    optimizer and RNG restored, metrics.jsonl cut back to that step); otherwise, or before the first checkpoint
    of a run that was stopped early, a fresh start."""
    ckpt = load_checkpoint(cfg.out_dir, optimizer, env.rank) if cfg.resume else None
    if ckpt is None:
        if cfg.resume:
            env.print(f"--resume: no checkpoint in {cfg.out_dir} yet; starting at step 0")
        run = env.gather_object(uuid.uuid4().hex)[0]  # stamps this run's files, kept across resumes
        return None, 0, {"run": run}
    weights, step, extra = ckpt
    env.print(f"resumed from {cfg.out_dir} at step {step}")
    log = os.path.join(cfg.out_dir, "metrics.jsonl")
    if env.is_main and os.path.exists(log):  # the lines a stopped run logged after its last checkpoint go
        write_text(log, "".join(l for l in open(log) if json.loads(l)["step"] <= step))
    return weights, step, extra


def train(cfg, env, model, optimizer, batches, step_fn, evaluate, state_fn, start_step, extra, best_key="score"):
    """Run optimizer steps start_step..cfg.max_steps.
    batches: iterator of micro-batches (already positioned for start_step); step_fn(batch) -> (loss, {name: value})
    under autocast; evaluate() -> {metric: value}; state_fn() -> the weights to checkpoint; start_step and extra
    ({"run": id, "best": score}): what resume() returned.
    Writes out_dir/{model.safetensors, train_state.pt, metrics.jsonl, best.safetensors}.
    Returns (the last eval metrics, how many unreadable samples were skipped)."""
    extra = dict(extra)
    best = extra.get("best")
    ddp_model = model
    if env.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0, seen, sums, skipped, last = time.time(), 0, {}, 0, {}
    t_run, step, n_steps = time.time(), start_step, 0
    stop = min(cfg.max_steps, cfg.halt_at) if cfg.halt_at > 0 else cfg.max_steps
    while step < stop:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        parts = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            skipped += batch.get("skipped", 0)
            if "index" not in batch:
                continue  # a batch of nothing but unreadable samples
            sync = micro == cfg.grad_accum - 1 or env.world == 1
            with (nullcontext() if sync else ddp_model.no_sync()), env.autocast():
                loss, parts = step_fn(batch, ddp_model)
            (loss / cfg.grad_accum).backward()
            seen += len(batch["index"])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        loss_value = env.sum(sum(v.double() for v in parts.values()) if parts else torch.zeros((), dtype=torch.float64))
        if not math.isfinite(loss_value.item()):
            raise FloatingPointError(f"non-finite loss {loss_value.item()} at step {step} ({parts}); stopping. "
                                     f"The last good checkpoint in {cfg.out_dir} is intact; lower --lr or use "
                                     "--dtype float32 and resume with --resume.")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, n_steps = step + 1, n_steps + 1
        if step % cfg.log_interval == 0 or step == stop:
            dt = time.time() - t0
            rate = seen * env.world / dt
            # the mean over every process's micro-batches: with DDP, the loss of the whole global batch
            avg = {k: (env.sum(torch.tensor(v, dtype=torch.float64)) / (n_steps * env.world)).item()
                   for k, v in sums.items()}
            eta = (cfg.max_steps - step) * (time.time() - t_run) / (step - start_step)
            env.print(f"step {step}/{cfg.max_steps} | loss {sum(avg.values()):.4f} ("
                      + " ".join(f"{k} {v:.3f}" for k, v in avg.items())
                      + f") | lr {lr:.2e} | {rate:.1f} samples/s | ETA {fmt_time(eta)}")
            if env.is_main:
                log_metrics(cfg.out_dir, {"step": step, "lr": lr, "samples_per_s": round(rate, 2),
                                          **{k: round(v, 5) for k, v in avg.items()}})
            t0, seen, sums, n_steps = time.time(), 0, {}, 0
        if step % cfg.eval_interval == 0 or step == stop:
            model.eval()
            metrics = evaluate() if env.is_main else {}
            model.train()
            rng = env.gather_object(rng_state())
            if env.is_main:
                score = metrics.get(best_key)
                env.print(f"eval step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                log_metrics(cfg.out_dir, {"step": step, "eval": True, **metrics})
                weights = state_fn()
                if score is not None and (best is None or score > best):
                    best = extra["best"] = score
                    save_weights(os.path.join(cfg.out_dir, "best.safetensors"), weights,
                                 {"step": str(step), "run": extra["run"]})
                save_checkpoint(cfg.out_dir, weights, optimizer, step, extra, rng)
            if env.world > 1:
                dist.barrier()
            last = metrics
    if skipped:
        env.print(f"skipped {skipped} unreadable samples (bad image, empty or undecodable caption)")
    return last, skipped


def run_cli(main, *more_errors):
    """Run a script's main(): the errors a user can fix (missing file, no network, a diverged run, ...) end with
    one line on stderr and exit code 1 instead of a traceback."""
    try:
        main()
    except (FileNotFoundError, ConnectionError, FloatingPointError, CheckpointError, *more_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
