"""
LoRA (Hu et al. 2021) by hand: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with B = 0 at the start so a
fresh adapter changes nothing. LoRALinear *is* an nn.Linear (same `weight`, `bias`), so base checkpoints load
into a wrapped model unchanged, and its extra keys (`q_proj.lora_A.weight`, `q_proj.lora_B.weight`) are exactly
peft's, which is what makes the adapter file loadable by the rest of the ecosystem.
"""
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, bias, r, alpha, dropout):
        super().__init__(in_features, out_features, bias=bias)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear / peft
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.enabled and not self.merged:
            # the scale on the r-wide middle, not on the out-wide result: the same product, r/out of the work
            y = y + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)
        return y

    def delta_weight(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, r=8, alpha=16, dropout=0.0, targets=DEFAULT_TARGETS, freeze_base=True):
    """Replace every nn.Linear whose own name is in `targets` with a LoRALinear sharing its weights.
    With freeze_base, everything but the LoRA matrices stops requiring grad. Returns the wrapped names."""
    targets = set(targets.split(",") if isinstance(targets, str) else targets)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                lora = LoRALinear(child.in_features, child.out_features, child.bias is not None, r, alpha, dropout)
                lora.to(device=child.weight.device)
                lora.weight, lora.bias = child.weight, child.bias  # share, don't copy
                setattr(parent, child_name, lora)
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in {type(model).__name__}")
    if freeze_base:
        for name, p in model.named_parameters():
            p.requires_grad = ".lora_A." in name or ".lora_B." in name
    return wrapped


def merge_lora(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()


def merged_state_dict(model):
    """The model's weights in fp32 with every adapter folded in, without the lora_ keys. The model itself is
    not touched: merging in place into bf16 weights and unmerging would not give the same weights back."""
    sd = {k: v.float() for k, v in model.state_dict().items() if "lora_" not in k}
    for name, m in lora_modules(model).items():
        sd[f"{name}.weight"] = sd[f"{name}.weight"] + m.delta_weight().float()
    return sd


@contextmanager
def lora_disabled(model):
    """Run the base model: inside this block every adapter is skipped (bit-identical to the unwrapped model)."""
    mods = lora_modules(model).values()
    assert not any(m.merged for m in mods), "unmerge before disabling: merged weights cannot be switched off"
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def lora_state_dict(model):
    """Only the adapter, under peft's key names."""
    return {f"{PEFT_PREFIX}{name}.{ab}.weight": getattr(m, ab).weight.detach().contiguous()
            for name, m in lora_modules(model).items() for ab in ("lora_A", "lora_B")}


def save_adapter(model, out_dir, base_model_name_or_path=None, metadata=None):
    """peft's adapter folder: adapter_config.json + adapter_model.safetensors (metadata: extra string pairs for
    the safetensors header, e.g. which training step wrote it)."""
    mods = lora_modules(model)
    assert mods, "the model has no LoRA layers to save"
    any_m = next(iter(mods.values()))
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": any_m.r, "lora_alpha": any_m.alpha, "lora_dropout": any_m.lora_dropout.p,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in mods}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    path = os.path.join(out_dir, "adapter_model.safetensors")
    save_file({k: v.float().cpu() for k, v in lora_state_dict(model).items()}, path + ".tmp",
              metadata={"format": "pt", **(metadata or {})})
    os.replace(path + ".tmp", path)  # never a half-written adapter under the real name


def load_adapter(model, adapter_dir, freeze_base=True):
    """Wrap `model` as adapter_config.json says and load the adapter strictly (every key, every shape)."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    targets = cfg["target_modules"]
    targets = targets.split(",") if isinstance(targets, str) else targets
    apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), targets, freeze_base)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in load_file(path).items()}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         f" unexpected {unexpected[:5]} wrong shapes {bad[:5]}")
    for name, m in lora_modules(model).items():
        for ab in ("lora_A", "lora_B"):
            getattr(m, ab).weight.data.copy_(tensors[f"{PEFT_PREFIX}{name}.{ab}.weight"])
    return cfg
