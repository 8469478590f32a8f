"""The CPU kernels of jamba/csrc/mamba_cpu.cpp: built at first use, loaded with ctypes, called on fp32 tensors.

A decode step through PyTorch operators spends most of its time in operator overhead (a Mamba layer is some forty
small operators), and a prefill spends most of it in the chunked scan's temporaries. These kernels do the conv and
the scan with its surroundings in one call each. `torch.utils.cpp_extension` builds them into its cache, once per
machine, which needs ninja and a C++ compiler. When the build fails, `kernels()` returns None and logs why, and the
model keeps the PyTorch path. JAMBA_NATIVE_KERNELS=0 turns them off.

Besides the Mamba conv and scan, decode-sized calls (up to MAX_LINEAR_ROWS rows) get kernels for the linear
layers, the SwiGLU MLP, the experts, RMSNorm, the attention step and whole halves of a block. At those sizes a
step is bound by reading the weights and by Python's cost per operator, so one call per half-block removes most
of the latter.

The library also contains csrc/shared_wait.cpp, the cross-process wait and wake-up of cluster/links.py.

Shapes, as in jamba/ssm.py: B rows, L steps, I channels (a multiple of 8), N d_state (at most 64), R dt_rank,
W conv width, S cache slots. Activations are (B, L, I), channels last.

NOTE: the methods of `Kernels` check nothing: a tensor of the wrong shape, dtype or layout makes the C++ code read
or write out of bounds. jamba.model checks every condition before it calls them.
"""

import ctypes
import functools
import logging
import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("mamba_cpu.cpp", "shared_wait.cpp")]
MAX_STATE = 64  # kMaxState in the source
MAX_LINEAR_ROWS = 64  # rows up to which the small-batch products beat MKL on the development machine

# Argument types of the library's functions. Pointers travel as plain integers (tensor.data_ptr()), the cheapest
# argument ctypes converts; None is a null pointer.
_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "jamba_conv": [_P, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I],
    "jamba_conv_step": [_P, _I, _P, _P, _P, _P, _P, _I, _I, _I],
    "jamba_scan": [_P, _P, _P, _I, _I, _P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _C, _P, _I, _I, _I, _I, _I],
    "jamba_linear_small": [_P, _I, _P, _P, _P, _I, _I, _I],
    "jamba_mlp_small": [_P, _P, _P, _P, _P, _I, _I, _I],
    "jamba_moe_small": [_P, _P, _P, _I, _I, _P, _P, _P, _P, _I, _P, _I, _I],
    "jamba_rms_norm": [_P, _P, _P, _I, _I, _F],
    "jamba_attention_step": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F],
    "jamba_mamba_step": [_P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                         _I, _I, _I, _I, _I, _I],
    "jamba_mlp_block": [_P, _P, _F, _P, _P, _P, _P, _I, _I, _I],
    "jamba_moe_block": [_P, _P, _F, _P, _I, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I],
    "jamba_silu_mul": [_P, _P, _P, _I],
}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arch_flags() -> tuple[str, list[str]]:
    """Return the build's name and flags: AVX-512 where the CPU has it, AVX2 and FMA where it has both, and the
    compiler's default otherwise."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic", []
    flags = _cpu_flags()
    if {"avx2", "fma", "avx512f"} <= flags:
        return "avx512", ["-mavx2", "-mfma", "-mavx512f"]
    if {"avx2", "fma"} <= flags:
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


class Kernels:
    """Typed entry points of the built library."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, None
            setattr(self, "_" + name.removeprefix("jamba_"), function)
        lib.jamba_wide_product_rows.argtypes, lib.jamba_wide_product_rows.restype = [], ctypes.c_int64
        lib.jamba_wait_word.argtypes, lib.jamba_wait_word.restype = [_P, ctypes.c_uint32, _P, _I, _I], _I
        lib.jamba_set_word.argtypes, lib.jamba_set_word.restype = [_P, ctypes.c_uint32, _P], None
        self.wait_word, self.set_word = lib.jamba_wait_word, lib.jamba_set_word  # see csrc/shared_wait.cpp
        # Whether linear_small also serves more than MAX_LINEAR_ROWS rows (prefill sizes), as AVX-512 builds do.
        self.wide_products = lib.jamba_wide_product_rows() > 0

    def linear_small(self, x, weight, bias=None) -> torch.Tensor:
        """Return x @ weight^T + bias (M, N) for x (M, K) with unit column stride, M <= MAX_LINEAR_ROWS unless
        `wide_products` is set.

        K is a multiple of 8; weight (N, K) and bias (N,) are contiguous.
        """
        rows, size = x.shape
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        self._linear_small(_ptr(x), x.stride(0), _ptr(weight), _ptr(bias), _ptr(out), rows, weight.shape[0], size)
        return out

    def mlp_small(self, x, gate, up, down) -> torch.Tensor:
        """Return the SwiGLU MLP down(silu(gate(x)) * up(x)) for x (M, D) contiguous, M <= MAX_LINEAR_ROWS.

        gate and up are (F, D) and down (D, F), contiguous, without biases. D and F are multiples of 8.
        """
        out = torch.empty_like(x)
        self._mlp_small(_ptr(x), _ptr(gate), _ptr(up), _ptr(down), _ptr(out), x.shape[0], x.shape[1], gate.shape[0])
        return out

    def moe_small(self, x, weights, experts, ids, mlps) -> torch.Tensor:
        """Compute jamba.model.run_experts for x (T, D) contiguous, T <= MAX_LINEAR_ROWS.

        weights (T, K) fp32 and experts (T, K) int64 are contiguous. mlps[j] = (gate, up, down) are the weights of
        expert ids[j], as in `mlp_small`.
        """
        tokens, k = experts.shape
        table, ids = expert_table(mlps), torch.tensor(list(ids), dtype=torch.int64)
        out = torch.empty_like(x)
        self._moe_small(_ptr(x), _ptr(weights), _ptr(experts), tokens, k, _ptr(ids), _ptr(table[0]), _ptr(table[1]),
                        _ptr(table[2]), len(mlps), _ptr(out), x.shape[1], mlps[0][0].shape[0])
        return out

    def mlp_block(self, x, norm, weights) -> torch.Tensor:
        """Return x + mlp(norm(x)) for rows x (T, D) contiguous, with weights = (gate, up, down) as in `mlp_small`."""
        out = torch.empty_like(x)
        gate, up, down = weights
        self._mlp_block(_ptr(x), _ptr(norm.weight), norm.eps, _ptr(gate), _ptr(up), _ptr(down), _ptr(out),
                        x.shape[0], x.shape[1], gate.shape[0])
        return out

    def moe_block(self, x, norm, router, top_k: int, table, sizes):
        """Return x + the experts' weighted sum for rows x (T, D) contiguous, and the router logits (T, E).

        norm is the pre-feed-forward RMSNorm and router the (E, D) router weight. `table` comes from
        `expert_table` over all E experts in order. `sizes` is (E, F), F being the experts' intermediate size.
        """
        experts, hidden = sizes
        out = torch.empty_like(x)
        logits = torch.empty(x.shape[0], experts, dtype=torch.float32)
        ids = torch.arange(experts, dtype=torch.int64)
        self._moe_block(_ptr(x), _ptr(norm.weight), norm.eps, _ptr(router), top_k, _ptr(ids), _ptr(table[0]),
                        _ptr(table[1]), _ptr(table[2]), experts, _ptr(out), _ptr(logits), x.shape[0], x.shape[1],
                        hidden)
        return out, logits

    def attention_step(self, q, k, v, keys, values, slots, positions) -> torch.Tensor:
        """Run one decode step of attention from the cache: q (B, H, Dh), k and v (B, G, Dh), contiguous.

        Store k and v at `positions` (B,) of `slots` (B,) in keys and values (S, G, T, Dh), then attend over each
        slot's positions up to and including the new one, scaled by 1/sqrt(Dh). Return (B, H, Dh).
        """
        batch, heads, size = q.shape
        out = torch.empty_like(q)
        self._attention_step(_ptr(q), _ptr(k), _ptr(v), _ptr(keys), _ptr(values), _ptr(slots), _ptr(positions),
                             _ptr(out), batch, heads, k.shape[1], keys.shape[2], size, size ** -0.5)
        return out

    def mamba_step(self, x, plan, conv_cache, ssm_cache, slots, A) -> torch.Tensor:
        """Return x + mixer(norm(x)) for one decode step of rows x (B, Dm), contiguous (see jamba_mamba_step).

        `plan` is a MambaStepPlan of the block's RMSNorm and MambaMixer; A is -exp(mixer.A_log).
        """
        batch, width = x.shape
        out = torch.empty_like(x)
        self._mamba_step(x.data_ptr(), plan.norm, plan.norm_eps, plan.in_weight, plan.in_bias, plan.conv_weight,
                         plan.conv_bias, conv_cache.data_ptr(), plan.x_weight, plan.dt_norm, plan.b_norm, plan.c_norm,
                         plan.eps, plan.dt_weight, plan.dt_bias, A.data_ptr(), plan.skip, plan.out_weight,
                         plan.out_bias, ssm_cache.data_ptr(), slots.data_ptr(), out.data_ptr(), batch, width,
                         plan.channels, plan.state, plan.rank, plan.conv_width)
        return out

    def rms_norm(self, x, weight, eps: float) -> torch.Tensor:
        """Return the RMSNorm of the last dimension of contiguous fp32 x, as torch's rms_norm computes it."""
        out = torch.empty_like(x)
        self._rms_norm(_ptr(x), _ptr(weight), _ptr(out), x.numel() // x.shape[-1], x.shape[-1], eps)
        return out

    def silu_mul(self, gate, up) -> torch.Tensor:
        """Return silu(gate) * up for contiguous fp32 tensors of one shape with a multiple of 8 elements."""
        out = torch.empty_like(gate)
        self._silu_mul(_ptr(gate), _ptr(up), _ptr(out), gate.numel())
        return out

    def conv(self, x, weight, bias, conv_cache=None, slots=None) -> torch.Tensor:
        """Return silu(causal depthwise conv(x) + bias) (B, L, I) for x (B, L, I) with unit channel stride.

        weight (I, W) and bias (I,) are contiguous. With conv_cache (S, I, W) and slots (B,), each row's last W
        inputs are stored in its slot.
        """
        batch, length, channels = x.shape
        out = torch.empty(batch, length, channels, dtype=torch.float32)
        self._conv(_ptr(x), x.stride(0), x.stride(1), _ptr(weight), _ptr(bias), _ptr(out), _ptr(conv_cache),
                   _ptr(slots), batch, length, channels, weight.shape[1])
        return out

    def conv_step(self, x, weight, bias, conv_cache, slots) -> torch.Tensor:
        """Shift each row of x (B, I) into its slot's window and return silu(conv + bias) (B, I)."""
        batch, channels = x.shape
        out = torch.empty(batch, channels, dtype=torch.float32)
        self._conv_step(_ptr(x), x.stride(0), _ptr(weight), _ptr(bias), _ptr(out), _ptr(conv_cache),
                        _ptr(slots), batch, channels, weight.shape[1])
        return out

    def scan(self, u, dbc, z, norms, eps, dt_weight, dt_bias, A, D, ssm_cache=None, slots=None,
             from_state=False, return_last_state=False):
        """Run the selective scan fused with the RMSNorm of dt, B and C, the dt projection, softplus, D and the gate.

        u (B, L, I) is contiguous, and so is dbc (B, L, R + 2N), x_proj's output before the norms. z (B, L, I) has
        unit channel stride. norms are the three norm weights (R,), (N,), (N,). dt_weight is (I, R), dt_bias (I,),
        A (I, N) already negative, D (I,) or None. The state starts from the slots' cached state when from_state
        is set, and from zeros otherwise. Its last value goes back to ssm_cache (S, I, N) when that is given.
        Return y (B, L, I), and the last state (B, I, N) when return_last_state.
        """
        batch, length, channels = u.shape
        state_size, rank = A.shape[1], dt_weight.shape[1]
        y = torch.empty_like(u)
        last = torch.empty(batch, channels, state_size, dtype=torch.float32) if return_last_state else None
        self._scan(_ptr(u), _ptr(dbc), _ptr(z), z.stride(0), z.stride(1), *(_ptr(w) for w in norms), eps,
                   _ptr(dt_weight), _ptr(dt_bias), _ptr(A), _ptr(D), _ptr(y), _ptr(ssm_cache), _ptr(slots),
                   int(from_state), _ptr(last), batch, length, channels, state_size, rank)
        return (y, last) if return_last_state else y


class MambaStepPlan(NamedTuple):
    """The addresses and sizes jamba_mamba_step reads from a block's RMSNorm and MambaMixer, gathered once.

    `tensors` keeps the parameters it was made from, both to keep the addresses valid and to tell when a module
    got new parameters (`MambaStepPlan.tensors` is compared by identity).
    """

    tensors: tuple
    norm: int
    norm_eps: float
    in_weight: int
    in_bias: int | None
    conv_weight: int
    conv_bias: int | None
    x_weight: int
    dt_norm: int
    b_norm: int
    c_norm: int
    eps: float
    dt_weight: int
    dt_bias: int
    skip: int
    out_weight: int
    out_bias: int | None
    channels: int
    state: int
    rank: int
    conv_width: int


def expert_table(mlps) -> torch.Tensor:
    """Return the addresses (3, E) of the experts' gate, up and down weights, mlps[e] = (gate, up, down).

    The addresses are valid while those weights live; callers keep the weights next to the table.
    """
    return torch.tensor([[m[i].data_ptr() for m in mlps] for i in range(3)], dtype=torch.int64)


def _ptr(tensor):
    return None if tensor is None else tensor.data_ptr()



@functools.lru_cache(maxsize=None)
def kernels() -> Kernels | None:
    """Build (or find in torch's extension cache) and load the kernels; return None and log why on failure."""
    from torch.utils.cpp_extension import load

    if os.environ.get("JAMBA_NATIVE_KERNELS", "1") == "0":
        log.info("native CPU kernels are disabled by JAMBA_NATIVE_KERNELS=0; the PyTorch path runs")
        return None
    name, flags = _arch_flags()
    # pip's ninja lives next to the interpreter, which is not on PATH when a virtual environment's python runs
    # without the environment activated.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, [bin_dir, os.environ.get("PATH")]))
    try:
        # -fopenmp makes at::parallel_for in the source run on PyTorch's OpenMP pool: torch has already loaded its
        # own libgomp into the process, and the kernels bind to that library.
        path = load(name=f"jamba_mamba_cpu_{name}", sources=[str(s) for s in SOURCES], extra_cflags=["-O3", "-fopenmp", *flags],
                    extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return Kernels(path)
    except Exception as error:  # a missing compiler or ninja shows up as one of several exception types
        log.warning("building the native CPU kernels failed, so the PyTorch path runs (install a C++ compiler "
                    "and ninja to use them): %s", error)
        return None
