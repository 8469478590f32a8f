"""Jamba: a hybrid Transformer-Mamba mixture-of-experts language model (Lieber et al., 2024, arXiv 2403.19887).

Legend: B batch, L sequence, D hidden_size, V vocab, H attention heads, G key/value heads, Dh head dim,
I Mamba channels (mamba_expand * D), N d_state, W d_conv, R dt_rank, E experts, K experts per token,
S cache slots, T cache length.

Parameter names are those of transformers' `JambaForCausalLM`, so checkpoints load both ways without renaming.
Semantics that must match it exactly: the router softmax runs in fp32 over all experts and the top-K weights are
not renormalised; every token reaches its K experts (no capacity limit); RMSNorm is applied to dt, B and C in every
Mamba layer; padding is zeroed before and after the Mamba conv; attention has no positional encoding.
"""

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from jamba import native, ssm
from jamba.native import MAX_LINEAR_ROWS, MAX_STATE

log = logging.getLogger(__name__)


@dataclass
class JambaArgs:
    """Model hyperparameters, named and defaulted as in transformers' `JambaConfig`."""

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    use_mamba_kernels: bool = True

    def __post_init__(self):
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self._validate()

    def _validate(self):
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "num_experts", "num_experts_per_tok", "expert_layer_period",
                    "attn_layer_period", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
                    "max_position_embeddings"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the only activation Jamba uses), got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                             f"({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts "
                             f"({self.num_experts})")
        for kind in ("attn", "expert"):
            period, offset = getattr(self, f"{kind}_layer_period"), getattr(self, f"{kind}_layer_offset")
            if not 0 <= offset < period:
                raise ValueError(f"{kind}_layer_offset must be in [0, {kind}_layer_period={period}), got {offset}")
        if self.attn_layer_offset >= self.num_hidden_layers:
            raise ValueError(f"attn_layer_offset ({self.attn_layer_offset}) must be below num_hidden_layers "
                             f"({self.num_hidden_layers}), otherwise the model has no attention layer")
        if self.num_experts > 1 and self.expert_layer_offset >= self.num_hidden_layers:
            raise ValueError(f"expert_layer_offset ({self.expert_layer_offset}) must be below num_hidden_layers "
                             f"({self.num_hidden_layers}) when num_experts > 1, otherwise no layer has experts")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {value}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_channels(self) -> int:
        return self.mamba_expand * self.hidden_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "JambaArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_design(cls, layers: int, attn_to_mamba: tuple[int, int], expert_period: int, experts: int,
                    top_k: int, **overrides) -> "JambaArgs":
        """Build args from the paper's design space: l layers, a:m ratio, MoE every e layers, n experts, top-K.

        a:m = 1:m puts one attention layer in every block of 1+m layers, in its middle as in Jamba-v0.1.
        """
        attn, mamba = attn_to_mamba
        if attn != 1 or mamba < 1:
            raise ValueError(f"attn_to_mamba must be 1:m with m >= 1, got {attn}:{mamba}")
        period = attn + mamba
        return cls(num_hidden_layers=layers, attn_layer_period=period, attn_layer_offset=period // 2,
                   expert_layer_period=expert_period, expert_layer_offset=expert_period - 1 if expert_period > 1 else 0,
                   num_experts=experts, num_experts_per_tok=top_k, **overrides)

    @classmethod
    def from_dict(cls, config: dict) -> "JambaArgs":
        """Read a transformers `config.json` dict; keys this model does not use are ignored."""
        if config.get("model_type", "jamba") != "jamba":
            raise ValueError(f"config model_type must be 'jamba', got {config.get('model_type')!r}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        if "num_local_experts" in config and "num_experts" not in config:
            values["num_experts"] = config["num_local_experts"]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        return cls(**values)

    def to_dict(self) -> dict:
        return {"model_type": "jamba", "architectures": ["JambaForCausalLM"], **asdict(self)}

    def layer_schedule(self) -> list["LayerKind"]:
        """Return (mixer, has_experts) for every layer: the one place the schedule is computed."""
        return [
            LayerKind(
                mixer="attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba",
                has_experts=self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset,
            )
            for i in range(self.num_hidden_layers)
        ]


class LayerKind(NamedTuple):
    mixer: str  # "attention" or "mamba"
    has_experts: bool


PRESETS: dict[str, dict] = {
    "jamba-v0.1": dict(),
    "jamba-1.5-mini": dict(),
    "jamba-1.5-large": dict(hidden_size=8192, intermediate_size=24576, num_hidden_layers=72, num_attention_heads=64,
                            num_key_value_heads=8),
    # Runs on a CPU in milliseconds; one attention layer (at offset 1) among Mamba layers, MoE every other layer.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=1, expert_layer_period=2,
                 expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8,
                 max_position_embeddings=4096),
    # The shape the benchmarks in bench/ measure.
    "bench": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
                  mamba_expand=2, mamba_dt_rank=16, max_position_embeddings=8192),
}


class HybridCache:
    """Decoding state for a fixed pool of S sequence slots.

    Mamba layers keep a conv window (S, I, W) and an fp32 SSM state (S, I, N): constant size per sequence.
    Attention layers keep K and V (S, G, T, Dh), growing with the sequence up to T = max_len. `layers` restricts
    the cache to the layers one process owns, and `devices` places each layer's tensors next to its weights.
    """

    def __init__(self, args: JambaArgs, num_slots: int, max_len: int, layers=None, devices=None,
                 dtype: torch.dtype = torch.float32):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"num_slots and max_len must be positive, got {num_slots} and {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.conv, self.ssm, self.keys, self.values = {}, {}, {}, {}

        schedule = args.layer_schedule()
        for i in range(args.num_hidden_layers) if layers is None else layers:
            device = (devices or {}).get(i, "cpu")
            if schedule[i].mixer == "mamba":
                channels = args.mamba_channels
                self.conv[i] = torch.zeros(num_slots, channels, args.mamba_d_conv, dtype=dtype, device=device)
                self.ssm[i] = torch.zeros(num_slots, channels, args.mamba_d_state, dtype=torch.float32, device=device)
            else:
                shape = (num_slots, args.num_key_value_heads, max_len, args.head_dim)
                self.keys[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.values[i] = torch.zeros(shape, dtype=dtype, device=device)

    def free(self, slots) -> None:
        """Reset slots so that new sequences can use them."""
        slots = torch.as_tensor(slots, dtype=torch.long)
        self.lengths[slots] = 0
        for state in (*self.conv.values(), *self.ssm.values()):
            state[slots.to(state.device)] = 0

    def bytes_per_slot(self) -> int:
        tensors = (*self.conv.values(), *self.ssm.values(), *self.keys.values(), *self.values.values())
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def kv_bytes_per_token(self) -> int:
        """Bytes one more token adds to one sequence: only the attention layers' K and V grow."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


class CacheView(NamedTuple):
    """The cache state one forward pass reads and writes: the cache, the slot of each batch row, the step kind."""

    cache: HybridCache
    slots: torch.Tensor  # (B,) long, on CPU
    positions: torch.Tensor  # (B,) tokens already in each slot
    prefill: bool


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            kernels = _native_for_small_product(x, (self.weight,)) if x.is_contiguous() else None
            if kernels is not None:
                return kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # Lower precision: normalise in fp32, round, then scale, in the order transformers' Jamba does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention without positional encoding: the Mamba layers carry position."""

    def __init__(self, args: JambaArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (args.num_attention_heads, args.num_key_value_heads,
                                                            args.head_dim)
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=False)

    def forward(self, x, masks: "Masks", view: CacheView | None = None):
        batch, length, _ = x.shape
        if view is not None and not view.prefill:
            kernels = _native_for_decode(x, view.cache.keys[self.layer_idx])
            if kernels is not None:
                return self._step_native(x, view, kernels)
        mask = masks.attention
        q = dense(self.q_proj, x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k = dense(self.k_proj, x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, L, Dh)
        v = dense(self.v_proj, x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)

        if view is not None and not view.prefill:
            k, v, mask = self._append_and_read(k, v, view)
        elif view is not None:
            self._store_prompt(k, v, masks.padding, view)

        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        return dense(self.o_proj, out.transpose(1, 2).reshape(batch, length, -1))

    def _step_native(self, x, view, kernels):
        """Run a decode step with the cache update and the attention in one native call."""
        batch = x.shape[0]
        q = dense(self.q_proj, x).view(batch, self.num_heads, self.head_dim)
        k = dense(self.k_proj, x).view(batch, self.num_kv_heads, self.head_dim)
        v = dense(self.v_proj, x).view(batch, self.num_kv_heads, self.head_dim)
        cache = view.cache
        out = kernels.attention_step(q.contiguous(), k.contiguous(), v.contiguous(), cache.keys[self.layer_idx],
                                     cache.values[self.layer_idx], view.slots, view.positions.contiguous())
        return dense(self.o_proj, out.view(batch, 1, -1))

    def _store_prompt(self, k, v, padding, view):
        """Copy the prompt's K and V into the slots; left padding is dropped, so each slot starts at position 0."""
        keys, values = view.cache.keys[self.layer_idx], view.cache.values[self.layer_idx]
        length = k.shape[2]
        real = [length] * k.shape[0] if padding is None else padding.sum(-1).tolist()
        for row, slot in enumerate(view.slots.tolist()):
            n = real[row]
            keys[slot, :, :n] = k[row, :, length - n:]
            values[slot, :, :n] = v[row, :, length - n:]

    def _append_and_read(self, k, v, view):
        keys, values = view.cache.keys[self.layer_idx], view.cache.values[self.layer_idx]
        slots, positions = view.slots.to(keys.device), view.positions.to(keys.device)
        keys[slots, :, positions] = k[:, :, 0]
        values[slots, :, positions] = v[:, :, 0]

        span = int(view.positions.max()) + 1
        mask = torch.arange(span, device=keys.device)[None, :] <= positions[:, None]  # (B, span)
        return keys[slots, :, :span], values[slots, :, :span], mask[:, None, None, :]


class MambaMixer(nn.Module):
    """Selective state-space mixer (Mamba) with RMSNorm on dt, B and C, as in Jamba."""

    def __init__(self, args: JambaArgs, layer_idx: int, scan: str = "auto"):
        super().__init__()
        self.layer_idx = layer_idx
        self.scan_setting = scan
        channels, self.d_state, self.dt_rank = args.mamba_channels, args.mamba_d_state, args.mamba_dt_rank
        self.in_proj = nn.Linear(args.hidden_size, channels * 2, bias=args.mamba_proj_bias)
        self.conv1d = nn.Conv1d(channels, channels, kernel_size=args.mamba_d_conv, groups=channels,
                                padding=args.mamba_d_conv - 1, bias=args.mamba_conv_bias)
        self.x_proj = nn.Linear(channels, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, channels, bias=True)
        # S4D-real initialisation: A = -(1..N) for every channel, stored as log(-A) so that A stays negative.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(channels, 1))
        self.D = nn.Parameter(torch.ones(channels))
        self.out_proj = nn.Linear(channels, args.hidden_size, bias=args.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, args.rms_norm_eps)
        self.b_layernorm = RMSNorm(self.d_state, args.rms_norm_eps)
        self.c_layernorm = RMSNorm(self.d_state, args.rms_norm_eps)

    def forward(self, x, pad_mask=None, view: CacheView | None = None):
        kernels = ssm.resolve_kernels(self.scan_setting, x.device.type)
        if kernels.native is not None and self._native_applies(x):
            return self._forward_native(x, pad_mask, view, kernels.native)
        if pad_mask is not None:
            x = x * pad_mask[..., None].to(x.dtype)
        hidden, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, I, L) each
        if pad_mask is not None:
            hidden = hidden * pad_mask[:, None, :].to(hidden.dtype)

        if view is not None and not view.prefill:
            return self._step(hidden[..., 0], gate[..., 0], view, kernels)[:, None, :]

        conv_weight = self.conv1d.weight[:, 0, :]  # (I, W)
        if view is not None:
            window = F.pad(hidden, (max(0, conv_weight.shape[1] - hidden.shape[-1]), 0))[..., -conv_weight.shape[1]:]
            view.cache.conv[self.layer_idx][view.slots.to(hidden.device)] = window
        hidden = kernels.conv(hidden, conv_weight, self.conv1d.bias)
        if pad_mask is not None:
            hidden = hidden * pad_mask[:, None, :].to(hidden.dtype)

        delta, B, C = self._project(hidden.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        y, last_state = kernels.scan(hidden, delta, A, B, C, self.D, gate, self.dt_proj.bias.float(), True,
                                     return_last_state=True)
        if view is not None:
            view.cache.ssm[self.layer_idx][view.slots.to(hidden.device)] = last_state
        return self.out_proj(y.transpose(1, 2))

    def _native_applies(self, x) -> bool:
        """Return whether the fused CPU kernels can run this call: fp32 inference, plain modules around the scan."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False  # the kernels have no backward
        return (x.dtype == torch.float32 and self.in_proj.weight.dtype == torch.float32
                and type(self.dt_proj) is nn.Linear and type(self.conv1d) is nn.Conv1d
                and self.D.shape[0] % 8 == 0 and self.d_state <= MAX_STATE)

    def step_with_residual(self, x, norm: "RMSNorm", view: CacheView):
        """Return x + self(norm(x)) for a decode step in one native call, or None where that call does not apply."""
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
                or not 0 < x.shape[0] * x.shape[1] <= MAX_LINEAR_ROWS):
            return None
        kernels = ssm.resolve_kernels(self.scan_setting, "cpu").native
        plan = None if kernels is None else self._step_plan(norm)
        if plan is None:
            return None
        cache = view.cache
        out = kernels.mamba_step(x.view(x.shape[0] * x.shape[1], -1), plan, cache.conv[self.layer_idx],
                                 cache.ssm[self.layer_idx], view.slots, self._negative_A())
        return out.view_as(x)

    def _step_plan(self, norm: "RMSNorm"):
        """Return the MambaStepPlan of norm and this mixer, or None if a module or parameter is not plain.

        The plan is cached and made again when a parameter object changes. Modules and parameters are read from
        their dictionaries, because nn.Module attribute lookups would cost more than the rest of the native step's
        Python side.
        """
        modules = self._modules
        in_proj, x_proj, out_proj = modules["in_proj"], modules["x_proj"], modules["out_proj"]
        conv, dt_proj = modules["conv1d"], modules["dt_proj"]
        norms = (norm, modules["dt_layernorm"], modules["b_layernorm"], modules["c_layernorm"])
        if (any(type(m) is not nn.Linear for m in (in_proj, x_proj, out_proj, dt_proj)) or type(conv) is not nn.Conv1d
                or any(type(n) is not RMSNorm for n in norms)):
            return None
        tensors = (*(n._parameters["weight"] for n in norms), in_proj._parameters["weight"],
                   in_proj._parameters["bias"], conv._parameters["weight"], conv._parameters["bias"],
                   x_proj._parameters["weight"], x_proj._parameters["bias"], dt_proj._parameters["weight"],
                   dt_proj._parameters["bias"], self._parameters["D"], out_proj._parameters["weight"],
                   out_proj._parameters["bias"])
        cached = self.__dict__.get("_plan")
        if cached is not None and all(a is b for a, b in zip(cached.tensors, tensors)):
            return cached
        self._plan = None
        present = [t for t in tensors if t is not None]
        if (tensors[9] is not None or tensors[11] is None  # x_proj without bias, dt_proj with one, as in Jamba
                or any(t.dtype != torch.float32 or not t.is_contiguous() for t in present)
                or norm.weight.shape[0] % 8 or self.D.shape[0] % 8 or self.d_state % 8 or self.d_state > MAX_STATE):
            return None
        def address(t):
            return None if t is None else t.data_ptr()

        self._plan = native.MambaStepPlan(
            tensors, address(tensors[0]), norm.eps, address(tensors[4]), address(tensors[5]), address(tensors[6]),
            address(tensors[7]), address(tensors[8]), address(tensors[1]), address(tensors[2]), address(tensors[3]),
            norms[1].eps, address(tensors[10]), address(tensors[11]), address(tensors[12]), address(tensors[13]),
            address(tensors[14]), self.D.shape[0], self.d_state, self.dt_rank, conv.weight.shape[-1])
        return self._plan

    def _forward_native(self, x, pad_mask, view, kernels):
        """Run the mixer in channels-last layout, with the conv and the scan (norms, dt, gate included) in C++."""
        channels = self.D.shape[0]
        if pad_mask is not None:
            x = x * pad_mask[..., None].to(x.dtype)
        xz = dense(self.in_proj, x)  # (B, L, 2I)
        hidden, gate = xz[..., :channels], xz[..., channels:]
        conv_weight = self.conv1d.weight[:, 0, :].contiguous()  # (I, W)
        slots = conv_cache = ssm_cache = None
        if view is not None:
            slots = view.slots
            conv_cache, ssm_cache = view.cache.conv[self.layer_idx], view.cache.ssm[self.layer_idx]
        decode = view is not None and not view.prefill

        if decode:
            u = kernels.conv_step(hidden[:, 0], conv_weight, self.conv1d.bias, conv_cache, slots)[:, None]
        else:
            if pad_mask is not None:
                hidden = hidden * pad_mask[..., None].to(hidden.dtype)
            u = kernels.conv(hidden, conv_weight, self.conv1d.bias, conv_cache, slots)
            if pad_mask is not None:
                u = u * pad_mask[..., None].to(u.dtype)

        norms = (self.dt_layernorm.weight, self.b_layernorm.weight, self.c_layernorm.weight)
        y = kernels.scan(u, dense(self.x_proj, u).contiguous(), gate, norms, self.dt_layernorm.eps, self.dt_proj.weight,
                         self.dt_proj.bias, self._negative_A(), self.D, ssm_cache, slots, from_state=decode)
        return dense(self.out_proj, y)

    def _negative_A(self):
        """Return -exp(A_log), computed again only when A_log changes (its storage or its in-place version)."""
        key = (self.A_log.data_ptr(), self.A_log._version)
        if getattr(self, "_A_key", None) != key:
            self._A, self._A_key = -torch.exp(self.A_log.detach()), key
        return self._A

    def _project(self, hidden):
        """hidden (B, L, I) -> delta (B, I, L) before bias and softplus, B and C (B, N, L), each RMS-normalised."""
        dt, B, C = torch.split(self.x_proj(hidden), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        return delta, B.transpose(1, 2), C.transpose(1, 2)

    def _step(self, hidden, gate, view, kernels):
        slots = view.slots.to(hidden.device)
        conv_state = view.cache.conv[self.layer_idx][slots]
        hidden = kernels.conv_step(conv_state, hidden, self.conv1d.weight[:, 0, :], self.conv1d.bias)
        view.cache.conv[self.layer_idx][slots] = conv_state

        delta, B, C = self._project(hidden[:, None, :])
        state = view.cache.ssm[self.layer_idx][slots]
        A = -torch.exp(self.A_log.float())
        y = kernels.step(state, hidden, delta[..., 0], A, B[..., 0], C[..., 0], self.D, gate,
                         self.dt_proj.bias.float(), True)
        view.cache.ssm[self.layer_idx][slots] = state
        return self.out_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, args: JambaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        weights = self.plain_weights()
        kernels = _native_for_small_product(x, weights)
        if kernels is not None:
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            return kernels.mlp_small(flat, *weights).view_as(x)
        return dense(self.down_proj, swiglu(dense(self.gate_proj, x), dense(self.up_proj, x)))

    def plain_weights(self):
        """Return the (gate, up, down) weights if all three are plain contiguous fp32 nn.Linear without bias."""
        modules = self._modules  # read directly, because nn.Module attribute lookups cost more than this check
        layers = (modules["gate_proj"], modules["up_proj"], modules["down_proj"])
        weights = []
        for layer in layers:
            if type(layer) is not nn.Linear:
                return None
            params = layer._parameters
            weight = params["weight"]
            if params["bias"] is not None or weight.dtype != torch.float32 or not weight.is_contiguous():
                return None
            weights.append(weight)
        return tuple(weights)


def _native_for_small_product(x, weights):
    """Return the native kernels if they can multiply a few rows x (..., D) by these weights, else None."""
    if weights is None or x.shape[-1] % 8 or weights[0].shape[0] % 8:
        return None
    return _native_for_decode(x, *weights)


def _native_for_decode(x, *tensors, any_rows: bool = False):
    """Return the native kernels for a decode-sized fp32 CPU inference call on x and these tensors, else None.

    With `any_rows`, a call with more rows gets them too where the build has the AVX-512 product for any size.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows == 0 or (rows > MAX_LINEAR_ROWS and not any_rows) or x.dtype != torch.float32
            or x.device.type != "cpu" or any(t.dtype != torch.float32 for t in tensors)
            or not _inference_only(x, *tensors)):
        return None
    kernels = native.kernels()
    if rows > MAX_LINEAR_ROWS and kernels is not None and not kernels.wide_products:
        return None
    return kernels


def _inference_only(*tensors) -> bool:
    """Return whether no gradient can flow through an operation on these tensors."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def dense(module: nn.Linear, x):
    """Return module(x), through the native product for a plain fp32 nn.Linear in CPU inference.

    A decode step multiplies a few rows by every weight matrix, and the kernel reads each weight once. At these
    sizes a perf profile of MKL's products showed most of their time in copying the weights. With AVX-512 the
    kernel also beats MKL at prefill sizes. Anything else, a peft-wrapped layer included, calls the module.
    """
    if type(module) is nn.Linear and x.shape[-1] % 8 == 0:
        params = module._parameters
        kernels = _native_for_decode(x, params["weight"], any_rows=True)
        if kernels is not None and params["weight"].is_contiguous():
            rows = x.numel() // x.shape[-1]
            flat = x.reshape(rows, x.shape[-1])
            if flat.stride(-1) != 1:
                flat = flat.contiguous()
            out = kernels.linear_small(flat, params["weight"], params["bias"])
            return out.view(*x.shape[:-1], out.shape[-1])
    return module(x)



def swiglu(gate, up):
    """Return silu(gate) * up, in one native pass for fp32 inference on CPU."""
    if (gate.dtype == torch.float32 and gate.device.type == "cpu" and gate.shape == up.shape
            and gate.numel() % 8 == 0 and _inference_only(gate, up)):
        kernels = native.kernels()
        if kernels is not None:
            return kernels.silu_mul(gate.contiguous(), up.contiguous())
    return F.silu(gate) * up


class Router(nn.Module):
    def __init__(self, args: JambaArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        self.top_k = args.num_experts_per_tok

    def forward(self, x):
        """x (T, D) -> router logits (T, E), top-K weights (T, K) in x's dtype, top-K expert ids (T, K)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return logits, weights.to(x.dtype), experts


class SparseMoE(nn.Module):
    """Top-K mixture of SwiGLU experts, dropless: every token is computed by each of its K experts."""

    def __init__(self, args: JambaArgs):
        super().__init__()
        self.router = Router(args)
        self.experts = nn.ModuleList(MLP(args) for _ in range(args.num_experts))

    def forward(self, x, dispatch=None):
        """x (B, L, D) -> output (B, L, D), router logits (B*L, E).

        `dispatch(x, weights, experts)` computes the experts elsewhere (the expert shards of a Ray replica); by
        default they run here.
        """
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, experts = self.router(flat)
        if dispatch is None:
            out = run_experts(self.experts, range(len(self.experts)), flat, weights, experts)
        else:
            out = dispatch(flat, weights, experts)
        return out.view_as(x), logits


def run_experts(modules, expert_ids, x, weights, experts):
    """Sum weight * expert(x) over the routed (token, expert) pairs whose expert is in expert_ids.

    x (T, D), weights and experts (T, K); modules[j] is the expert expert_ids[j]. Used by the local MoE and by the
    expert shards, so that both do the same arithmetic.
    """
    mlps = [module.plain_weights() for module in modules]
    kernels = None if any(m is None for m in mlps) else _native_for_small_product(x, mlps[0])
    if kernels is not None:
        return kernels.moe_small(x.contiguous(), weights.float().contiguous(), experts.contiguous(), expert_ids, mlps)
    out = torch.zeros_like(x)
    routed = set(experts.unique().tolist())  # in a decode step most experts get no token
    for module, expert in zip(modules, expert_ids):
        if expert not in routed:
            continue
        token, slot = torch.where(experts == expert)
        out.index_add_(0, token, module(x[token]) * weights[token, slot, None])
    return out


class JambaLayer(nn.Module):
    """Pre-norm block: a mixer (attention or Mamba) and a feed-forward (dense MLP or MoE), each residual."""

    def __init__(self, args: JambaArgs, layer_idx: int, scan: str = "auto"):
        super().__init__()
        self.kind = args.layer_schedule()[layer_idx]
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if self.kind.mixer == "attention":
            self.self_attn = Attention(args, layer_idx)
        else:
            self.mamba = MambaMixer(args, layer_idx, scan)
        self.pre_ff_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = SparseMoE(args) if self.kind.has_experts else MLP(args)

    def forward(self, x, masks: "Masks", view: CacheView | None = None, dispatch=None):
        """Return the new hidden states and the router logits (T, E), or an empty (0, 0) tensor without experts.

        `dispatch` runs the experts of an MoE layer elsewhere (see `SparseMoE.forward`).
        """
        fused = None
        if self.kind.mixer == "mamba" and view is not None and not view.prefill:
            fused = self.mamba.step_with_residual(x, self.input_layernorm, view)
        if fused is not None:
            x = fused
        elif self.kind.mixer == "attention":
            x = x + self.self_attn(self.input_layernorm(x), masks, view)
        else:
            x = x + self.mamba(self.input_layernorm(x), masks.padding, view)

        if dispatch is None:
            fused = self._feed_forward_native(x)
            if fused is not None:
                return fused
        h = self.pre_ff_layernorm(x)
        if self.kind.has_experts:
            h, router_logits = self.feed_forward(h, dispatch)
        else:
            h, router_logits = self.feed_forward(h), x.new_zeros(0, 0)
        return x + h, router_logits


    def _feed_forward_native(self, x):
        """Return (x + feed_forward(pre_ff_layernorm(x)), router logits) in one native call, or None."""
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
                or x.shape[-1] % 8 or not 0 < x.numel() // x.shape[-1] <= MAX_LINEAR_ROWS):
            return None
        plan = self._feed_forward_plan()
        if plan is None:
            return None
        kernels = native.kernels()
        if kernels is None:
            return None
        rows = x.numel() // x.shape[-1]
        norm = self._modules["pre_ff_layernorm"]
        if self.kind.has_experts:
            out, logits = kernels.moe_block(x.view(rows, -1), norm, plan.tensors[1], self.feed_forward.router.top_k,
                                            plan.table, (len(plan.experts), plan.experts[0][0].shape[0]))
            return out.view_as(x), logits
        return kernels.mlp_block(x.view(rows, -1), norm, plan.experts[0]).view_as(x), x.new_zeros(0, 0)

    def _feed_forward_plan(self):
        """Return the weights of the feed-forward half for the native kernels, or None if they are not all plain.

        As in MambaMixer._step_plan, the result is cached, made again when a parameter object changes, and read
        from the modules' dictionaries.
        """
        norm, ff = self._modules["pre_ff_layernorm"], self._modules["feed_forward"]
        if type(norm) is not RMSNorm:
            return None
        if self.kind.has_experts:
            router = ff._modules["router"] if type(ff) is SparseMoE else None
            if type(router) is not Router:  # wrapped, by peft for instance
                return None
            router = router._parameters["weight"]
            mlps = [expert.plain_weights() if type(expert) is MLP else None for expert in ff._modules["experts"]]
        else:
            mlps = [ff.plain_weights() if type(ff) is MLP else None]
            router = None
        if not mlps or any(m is None for m in mlps):
            return None
        tensors = (norm._parameters["weight"], router, *(w for m in mlps for w in m))
        cached = self.__dict__.get("_ff_plan")
        if cached is not None and all(a is b for a, b in zip(cached.tensors, tensors)):
            return cached
        self._ff_plan = None
        if (any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors if t is not None)
                or mlps[0][0].shape[0] % 8):
            return None
        self._ff_plan = _FeedForwardPlan(tensors, mlps, native.expert_table(mlps))
        return self._ff_plan


class _FeedForwardPlan(NamedTuple):
    """Weights of a block's feed-forward half as the native kernels take them."""

    tensors: tuple  # (norm weight, router weight or None, then each expert's gate, up and down weights)
    experts: list  # [(gate, up, down)] per expert; one entry for a dense MLP
    table: torch.Tensor  # jamba.native.expert_table(experts)


class Masks(NamedTuple):
    padding: torch.Tensor | None  # (B, L) bool, True for real tokens; None when nothing is padded
    attention: torch.Tensor | None  # (B, 1, L, L) bool, True where a query may attend; None for plain causal


def build_masks(attention_mask: torch.Tensor | None, length: int) -> Masks:
    if attention_mask is None or bool(attention_mask.all()):
        return Masks(None, None)
    padding = attention_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=padding.device).tril()
    # A padded query attends to itself only, so that no row is fully masked (which would give NaN).
    allowed = (causal & padding[:, None, :]) | torch.eye(length, dtype=torch.bool, device=padding.device)
    return Masks(padding, allowed[:, None])


class JambaOutput(NamedTuple):
    logits: torch.Tensor  # (B, L', V), L' = L or logits_to_keep
    router_logits: tuple[torch.Tensor, ...]  # one (B*L, E) tensor per MoE layer
    aux_loss: torch.Tensor | None  # load-balancing loss, computed without a cache only


class JambaModel(nn.Module):
    def __init__(self, args: JambaArgs, scan: str = "auto"):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.layers = nn.ModuleList(JambaLayer(args, i, scan) for i in range(args.num_hidden_layers))
        self.final_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Jamba(nn.Module):
    """The causal language model; `model.*` and `lm_head` mirror transformers' `JambaForCausalLM`."""

    def __init__(self, args: JambaArgs, scan: str = "auto"):
        super().__init__()
        self.args = args
        self.model = JambaModel(args, scan)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.args.initializer_range
        if isinstance(module, (nn.Linear, Router)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, MambaMixer):
            # Mamba's time-step init: softplus(bias) log-uniform in [1e-3, 1e-1], so that the state neither decays
            # within one step nor keeps every input forever.
            dt = torch.exp(torch.rand(module.dt_proj.bias.shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            module.dt_proj.bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, scan: str = "auto") -> "Jamba":
        from jamba.checkpoint import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype, scan=scan)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        from jamba.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    def new_cache(self, num_slots: int, max_len: int) -> HybridCache:
        devices = {}
        for i, layer in enumerate(self.model.layers):
            devices[i] = next(layer.parameters()).device
        return HybridCache(self.args, num_slots, max_len, devices=devices, dtype=self.lm_head.weight.dtype)

    def forward(self, input_ids, attention_mask=None, cache: HybridCache | None = None, slots=None,
                logits_to_keep: int = 0) -> JambaOutput:
        """Run the model.

        Without a cache: a full forward over input_ids (B, L), with attention_mask (B, L) marking real tokens
        (left or right padding). With a cache, `slots` (B,) names the slot of each row: empty slots are
        prefilled with left-padded prompts, and slots already holding a sequence take one new token (L = 1).
        logits_to_keep > 0 computes logits for the last positions only.
        """
        view = None if cache is None else open_cache_view(cache, input_ids.shape, attention_mask, slots)
        length = input_ids.shape[1]
        masks = build_masks(attention_mask, length) if view is None or view.prefill else Masks(None, None)

        x = self.model.embed_tokens(input_ids)
        router_logits = []
        for layer in self.model.layers:
            x, layer_router_logits = layer(x, masks, view)
            if layer.kind.has_experts:
                router_logits.append(layer_router_logits)
        x = self.model.final_layernorm(x)

        if view is not None:
            close_cache_view(view, length, attention_mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = dense(self.lm_head, x)

        aux_loss = None
        if view is None and router_logits:
            aux_loss = load_balancing_loss(router_logits, self.args.num_experts, self.args.num_experts_per_tok,
                                           attention_mask)
        return JambaOutput(logits, tuple(router_logits), aux_loss)


def open_cache_view(cache: HybridCache, shape, attention_mask, slots) -> CacheView:
    """Check that a batch of shape (B, L) fits the cache: it prefills empty slots or adds one token to occupied ones."""
    if slots is None:
        raise ValueError("slots is required with a cache: one slot index per batch row")
    slots = torch.as_tensor(slots, dtype=torch.long).cpu().contiguous()
    if slots.shape != tuple(shape[:1]):
        raise ValueError(f"slots must have one entry per batch row ({shape[0]}), got {tuple(slots.shape)}")
    if bool((slots < 0).any() or (slots >= cache.num_slots).any()):
        raise ValueError(f"slots must be in [0, {cache.num_slots}), got {slots.tolist()}")
    positions = cache.lengths[slots].clone()
    prefill = bool((positions == 0).all())
    if not prefill and (shape[1] != 1 or bool((positions == 0).any())):
        raise ValueError("with a cache, a batch either prefills empty slots or adds one token to occupied ones")
    new_tokens = shape[1] if attention_mask is None else int(attention_mask.sum(-1).max())
    if int(positions.max()) + new_tokens > cache.max_len:
        raise ValueError(f"sequence would exceed the cache length {cache.max_len}")
    return CacheView(cache, slots, positions, prefill)


def close_cache_view(view: CacheView, length: int, attention_mask) -> None:
    """Record the tokens a forward pass added to each slot."""
    added = length if attention_mask is None else attention_mask.sum(-1).cpu()
    view.cache.lengths[view.slots] = view.positions + added


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all MoE layers, ignoring padded tokens.

    E * sum_e f_e * P_e, where f_e is the share of top-K assignments that go to expert e and P_e the mean router
    probability of e. Balanced routing gives K (f_e sums to K), whatever the number of experts.
    """
    logits = torch.cat([r.float() for r in router_logits])  # (layers * B * L, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(1).float()  # (rows, E)
    if attention_mask is None:
        weight = torch.ones(logits.shape[0], 1, device=logits.device)
    else:
        weight = attention_mask.reshape(-1, 1).float().to(logits.device).repeat(len(router_logits), 1)
    total = weight.sum()
    tokens_per_expert = (chosen * weight).sum(0) / total
    prob_per_expert = (probs * weight).sum(0) / total
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def default_model_dir() -> Path:
    """Directory of the small model shipped with the package (trained by finetune/, see its README)."""
    return Path(__file__).parent / "default"
