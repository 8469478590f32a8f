"""peft LoRA on the `jamba/` model graph: target selection, wrapping, and loading saved adapters.

Targets are short names for the Linear layers of `jamba.model.Jamba`:

    Mamba layers      in_proj, x_proj, out_proj
    attention layers  q_proj, k_proj, v_proj, o_proj
    dense MLP layers  gate_proj, up_proj, down_proj
    MoE experts       experts.gate_proj, experts.up_proj, experts.down_proj   (opt-in, see Limitations)

`gate_proj`, `up_proj` and `down_proj` select the dense feed-forward layers only, and the `experts.` names select
the projections of every expert. Each name becomes one regular expression over module names. Module names equal
the parameter names of transformers' `JambaForCausalLM`, so a saved adapter directory (`adapter_config.json` and
`adapter_model.safetensors`) loads with `peft.PeftModel.from_pretrained` on that model too.

`--train-router` does not put LoRA on the router, because the router is a bare weight matrix rather than an
`nn.Linear`. peft's `modules_to_save` trains a full copy of it instead, and that copy is saved in the adapter under
the router's own name.

Serving: `serve/adapters.py` loads every adapter of a directory (`<directory>/<name>/`, as written here) into
one peft model and applies one adapter per batch row.

Limitations:
- LoRA on experts (`experts.*`) trains and merges here, but those adapters do not load on transformers 5.x
  `JambaForCausalLM`. transformers 5 stores the experts of a layer fused in 3D parameters (`experts.gate_up_proj`,
  `experts.down_proj`), and peft 0.21 has no per-expert-to-fused mapping for Jamba: `PeftModel.from_pretrained`
  raises "Target modules ... not found". The default targets therefore leave the experts out.
- `dt_proj` and `conv1d` cannot take LoRA, because both this model and transformers read their weights directly
  (the dt bias is applied inside the scan, and the conv runs as a depthwise kernel), so a LoRA branch would never run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from jamba.model import Jamba

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_ADAPTER = "default"

# Short target name -> module path below `model.layers.N.`.
TARGET_PATTERNS: dict[str, str] = {
    "in_proj": r"mamba\.in_proj",
    "x_proj": r"mamba\.x_proj",
    "out_proj": r"mamba\.out_proj",
    "q_proj": r"self_attn\.q_proj",
    "k_proj": r"self_attn\.k_proj",
    "v_proj": r"self_attn\.v_proj",
    "o_proj": r"self_attn\.o_proj",
    "gate_proj": r"feed_forward\.gate_proj",
    "up_proj": r"feed_forward\.up_proj",
    "down_proj": r"feed_forward\.down_proj",
    "experts.gate_proj": r"feed_forward\.experts\.\d+\.gate_proj",
    "experts.up_proj": r"feed_forward\.experts\.\d+\.up_proj",
    "experts.down_proj": r"feed_forward\.experts\.\d+\.down_proj",
}

# Targets whose adapters load on transformers' JambaForCausalLM as well: every layer gets some, and experts none.
DEFAULT_TARGETS: tuple[str, ...] = ("in_proj", "x_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                    "gate_proj", "up_proj", "down_proj")

_NORM_REASON = "it is an RMSNorm scale vector, not a matrix, so it has no low-rank update"
REJECTED_TARGETS: dict[str, str] = {
    "dt_proj": "the model reads dt_proj.weight directly and applies its bias inside the selective scan (as "
               "transformers' Jamba does), so a LoRA branch on it would never run",
    "conv1d": "it is a depthwise convolution whose weight the scan kernels read directly, so a LoRA branch on it "
              "would never run",
    "router": "the router is a bare weight matrix, not an nn.Linear; pass --train-router to train it fully",
    "embed_tokens": "the token embeddings stay frozen in LoRA fine-tuning; a new vocabulary needs full training",
    "lm_head": "the output head stays frozen in LoRA fine-tuning, so the adapter never changes the vocabulary "
               "projection",
    "A_log": "it is a parameter of the Mamba mixer, not a Linear layer",
    "D": "it is a parameter of the Mamba mixer, not a Linear layer",
    **{name: _NORM_REASON for name in ("input_layernorm", "pre_ff_layernorm", "final_layernorm", "dt_layernorm",
                                       "b_layernorm", "c_layernorm")},
}


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA hyperparameters of a fine-tuning run; the update of a target W is (alpha / rank) * B @ A."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the LoRA branch's input, in training only
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train_router: bool = False  # train full copies of the MoE routers, saved with the adapter

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        check_targets(self.targets)


def parse_targets(text: str) -> tuple[str, ...]:
    """Split a comma-separated target list such as "q_proj,v_proj" and check every name."""
    targets = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    check_targets(targets)
    return targets


def check_targets(targets: Sequence[str]) -> None:
    """Raise ValueError for an empty list, a target LoRA cannot work on, or an unknown name."""
    if not targets:
        raise ValueError(f"target modules must not be empty; valid targets are {', '.join(TARGET_PATTERNS)}")
    for name in targets:
        if name in REJECTED_TARGETS:
            raise ValueError(f"target module {name!r} cannot take LoRA: {REJECTED_TARGETS[name]}")
        if name not in TARGET_PATTERNS:
            raise ValueError(f"unknown target module {name!r}; valid targets are {', '.join(TARGET_PATTERNS)}")


def target_regex(targets: Sequence[str]) -> str:
    """Return the regular expression that peft full-matches against module names to find the LoRA targets."""
    check_targets(targets)
    return rf"model\.layers\.\d+\.({'|'.join(TARGET_PATTERNS[name] for name in targets)})"


def resolve_targets(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Return the names of the modules of `model` that `targets` select, and warn when most layers get none.

    Works on a model built on the meta device, so the driver of a job can check targets without loading weights.
    Raises ValueError when no module matches, for instance dense MLP targets on a model whose layers are all MoE.
    """
    pattern = re.compile(target_regex(targets))
    names = [name for name, module in model.named_modules()
             if pattern.fullmatch(name) and isinstance(module, torch.nn.Linear)]
    if not names:
        raise ValueError(f"target modules {list(targets)} match no layer of this model; the dense MLP targets "
                         "(gate_proj, up_proj, down_proj) exist only in layers without experts")

    num_layers = len(model.model.layers)
    touched = {int(name.split(".")[2]) for name in names}
    if 2 * len(touched) < num_layers:
        untouched = sorted(set(range(num_layers)) - touched)
        logger.warning("LoRA targets %s reach only %d of %d layers; layers %s are left untouched (in_proj, x_proj "
                       "and out_proj reach the Mamba layers, q/k/v/o_proj the attention layers)",
                       ",".join(targets), len(touched), num_layers, untouched)
    return names


def lora_config(spec: LoraSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_regex(spec.targets),
        modules_to_save=["router"] if spec.train_router else None,
    )


def apply_lora(model: Jamba, spec: LoraSpec, base_model_path: str | None = None) -> PeftModel:
    """Wrap `model` in peft LoRA layers; only the LoRA weights (and the router copies with train_router) train."""
    resolve_targets(model, spec.targets)
    if spec.train_router and not any(kind.has_experts for kind in model.args.layer_schedule()):
        raise ValueError("--train-router needs a model with MoE layers, and this one has none")
    peft_model = get_peft_model(model, lora_config(spec))
    # Set after wrapping, because get_peft_model overwrites it with the model's `name_or_path`, which Jamba lacks.
    peft_model.peft_config[DEFAULT_ADAPTER].base_model_name_or_path = base_model_path
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA rank %d alpha %g on %s%s: %d trainable parameters of %d (%.2f%%)", spec.rank, spec.alpha,
                ",".join(spec.targets), " + routers" if spec.train_router else "", trainable, total,
                100 * trainable / total)
    return peft_model


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """Read and check `adapter_config.json`: a LoRA adapter whose weights file sits next to it."""
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise ValueError(f"{adapter_dir} is not a peft adapter directory: {file.name} is missing")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type must be 'LORA', got {raw.get('peft_type')!r}")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    return config


def load_adapter_weights(model: PeftModel, adapter_dir: Path, name: str) -> None:
    """Load an adapter's weights strictly: every tensor must have a slot, and every LoRA slot a tensor."""
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=name)
    except RuntimeError as error:  # torch's load_state_dict reports mis-shaped tensors as RuntimeError
        raise ValueError(f"adapter {adapter_dir} does not fit this model: {error}") from error
    unexpected = sorted(result.unexpected_keys)
    # The missing keys also list every frozen base weight; only this adapter's own slots must be filled.
    missing = sorted(key for key in result.missing_keys if f".{name}." in key)
    if unexpected or missing:
        raise ValueError(f"adapter {adapter_dir} does not match the model: unexpected ({len(unexpected)}): "
                         f"{unexpected[:10]}; missing ({len(missing)}): {missing[:10]}")


def load_adapter(model: Jamba, adapter_dir: str | Path, name: str = DEFAULT_ADAPTER) -> PeftModel:
    """Wrap `model` with the adapter saved in `adapter_dir` under `name`, in eval mode, checking every key."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    # get_peft_model replaces the recorded base model path with the model's `name_or_path`, which Jamba lacks.
    base_model_path, config.base_model_name_or_path = config.base_model_name_or_path, None
    peft_model = get_peft_model(model, config, adapter_name=name)
    peft_model.peft_config[name].base_model_name_or_path = base_model_path
    load_adapter_weights(peft_model, adapter_dir, name)
    return peft_model.eval()
