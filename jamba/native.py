"""The CPU kernels of jamba/csrc/mamba_cpu.cpp: built at first use, loaded with ctypes, called on fp32 tensors.

A decode step through PyTorch operators spends most of its time in operator overhead (a Mamba layer is some forty
small operators), and a prefill spends most of it in the chunked scan's temporaries. These kernels do the conv and
the scan with its surroundings in one call each. `torch.utils.cpp_extension` builds them into its cache, once per
machine, which needs ninja and a C++ compiler. When the build fails, `kernels()` returns None and logs why, and the
model keeps the PyTorch path. JAMBA_NATIVE_KERNELS=0 turns them off.

Besides the Mamba conv and scan, decode-sized calls (up to MAX_LINEAR_ROWS rows) get kernels for the linear
layers, the SwiGLU MLP, the experts, RMSNorm, the attention step, and whole halves of a block: at those sizes a
step is bound by reading the weights once and by Python's per-operator cost, and one call per half-block removes
most of the latter.

Shapes, as in jamba/ssm.py: B rows, L steps, I channels (a multiple of 8), N d_state (at most 64), R dt_rank,
W conv width, S cache slots. Activations are (B, L, I), channels last.
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

SOURCE = Path(__file__).parent / "csrc" / "mamba_cpu.cpp"
MAX_STATE = 64  # kMaxState in the source
MAX_LINEAR_ROWS = 64  # rows up to which the small-batch products beat MKL here (decode steps)



def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arch_flags() -> tuple[str, list[str]]:
    """Return the build's name and flags: AVX2 and FMA where the CPU has both, the compiler's default otherwise."""
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


class Kernels:
    """Typed entry points of the built library."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        # Pointers travel as plain integers (tensor.data_ptr()), the cheapest argument ctypes converts.
        f, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._conv = lib.jamba_conv
        self._conv.argtypes = [f, i64, i64, f, f, f, f, f, i64, i64, i64, i64]
        self._conv_step = lib.jamba_conv_step
        self._conv_step.argtypes = [f, i64, f, f, f, f, f, i64, i64, i64]
        self._scan = lib.jamba_scan
        self._scan.argtypes = [f, f, f, i64, i64, f, f, f, ctypes.c_float, f, f, f, f, f, f, f, ci, f,
                               i64, i64, i64, i64, i64]
        self._linear_small = lib.jamba_linear_small
        self._linear_small.argtypes = [f, i64, f, f, f, i64, i64, i64]
        self._mlp_small = lib.jamba_mlp_small
        self._mlp_small.argtypes = [f, f, f, f, f, i64, i64, i64]
        self._moe_small = lib.jamba_moe_small
        self._moe_small.argtypes = [f, f, f, i64, i64, f, f, f, f, i64, f, i64, i64]
        self._rms_norm = lib.jamba_rms_norm
        self._rms_norm.argtypes = [f, f, f, i64, i64, ctypes.c_float]
        self._attention_step = lib.jamba_attention_step
        self._attention_step.argtypes = [f, f, f, f, f, f, f, f, i64, i64, i64, i64, i64, ctypes.c_float]
        self._mamba_step = lib.jamba_mamba_step
        c_float = ctypes.c_float
        self._mamba_step.argtypes = [f, f, c_float, f, f, f, f, f, f, f, f, f, c_float, f, f, f, f, f, f, f, f, f,
                                     i64, i64, i64, i64, i64, i64]
        self._mlp_block = lib.jamba_mlp_block
        self._mlp_block.argtypes = [f, f, c_float, f, f, f, f, i64, i64, i64]
        self._moe_block = lib.jamba_moe_block
        self._moe_block.argtypes = [f, f, c_float, f, i64, f, f, f, f, i64, f, f, i64, i64, i64]
        self._silu_mul = lib.jamba_silu_mul
        self._silu_mul.argtypes = [f, f, f, i64]
        for fn in (self._conv, self._conv_step, self._scan, self._silu_mul, self._linear_small, self._mlp_small,
                   self._moe_small, self._rms_norm, self._attention_step, self._mamba_step, self._mlp_block,
                   self._moe_block):
            fn.restype = None

    def linear_small(self, x, weight, bias=None) -> torch.Tensor:
        """x (M, K) with unit column stride, M <= MAX_LINEAR_ROWS, K a multiple of 8 -> x @ weight^T + bias (M, N).

        weight (N, K) and bias (N,) contiguous.
        """
        rows, size = x.shape
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        self._linear_small(_ptr(x), x.stride(0), _ptr(weight), _ptr(bias), _ptr(out), rows, weight.shape[0], size)
        return out

    def mlp_small(self, x, gate, up, down) -> torch.Tensor:
        """The SwiGLU MLP down(silu(gate(x)) * up(x)) for x (M, D) contiguous, M <= MAX_LINEAR_ROWS.

        gate and up (F, D), down (D, F), contiguous, without biases; D and F multiples of 8.
        """
        out = torch.empty_like(x)
        self._mlp_small(_ptr(x), _ptr(gate), _ptr(up), _ptr(down), _ptr(out), x.shape[0], x.shape[1], gate.shape[0])
        return out

    def moe_small(self, x, weights, experts, ids, mlps) -> torch.Tensor:
        """jamba.model.run_experts for x (T, D) contiguous, T <= MAX_LINEAR_ROWS.

        weights (T, K) fp32 and experts (T, K) int64, contiguous; mlps[j] = (gate, up, down) weights of expert
        ids[j], as in `mlp_small`.
        """
        tokens, k = experts.shape
        table, ids = expert_table(mlps), torch.tensor(list(ids), dtype=torch.int64)
        out = torch.empty_like(x)
        self._moe_small(_ptr(x), _ptr(weights), _ptr(experts), tokens, k, _ptr(ids), _ptr(table[0]), _ptr(table[1]),
                        _ptr(table[2]), len(mlps), _ptr(out), x.shape[1], mlps[0][0].shape[0])
        return out

    def mlp_block(self, x, norm, weights) -> torch.Tensor:
        """x + mlp(norm(x)) for rows x (T, D) contiguous; weights = (gate, up, down) as in `mlp_small`."""
        out = torch.empty_like(x)
        gate, up, down = weights
        self._mlp_block(_ptr(x), _ptr(norm.weight), norm.eps, _ptr(gate), _ptr(up), _ptr(down), _ptr(out),
                        x.shape[0], x.shape[1], gate.shape[0])
        return out

    def moe_block(self, x, norm, router, top_k: int, table, sizes):
        """x + the experts' weighted sum for rows x (T, D) contiguous, and the router logits (T, E).

        norm is the pre-feed-forward RMSNorm and router the (E, D) router weight; `table` comes from
        `expert_table` over all E experts in order, and `sizes` is (E, F), F the experts' intermediate size.
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
        """One decode step of attention from the cache: q (B, H, Dh), k and v (B, G, Dh), contiguous.

        Stores k and v at `positions` (B,) of `slots` (B,) in keys and values (S, G, T, Dh), then attends over
        each slot's positions up to and including the new one, scaled by 1/sqrt(Dh). Returns (B, H, Dh).
        """
        batch, heads, size = q.shape
        out = torch.empty_like(q)
        self._attention_step(_ptr(q), _ptr(k), _ptr(v), _ptr(keys), _ptr(values), _ptr(slots), _ptr(positions),
                             _ptr(out), batch, heads, k.shape[1], keys.shape[2], size, size ** -0.5)
        return out

    def mamba_step(self, x, plan, conv_cache, ssm_cache, slots, A) -> torch.Tensor:
        """x + mixer(norm(x)) for one decode step of rows x (B, Dm), contiguous (see jamba_mamba_step).

        `plan` is a MambaStepPlan of the block's RMSNorm and MambaMixer; A is -exp(mixer.A_log).
        """
        batch, width = x.shape
        out = torch.empty_like(x)
        p = plan
        self._mamba_step(x.data_ptr(), p.norm, p.norm_eps, p.in_weight, p.in_bias, p.conv_weight, p.conv_bias,
                         conv_cache.data_ptr(), p.x_weight, p.dt_norm, p.b_norm, p.c_norm, p.eps, p.dt_weight,
                         p.dt_bias, A.data_ptr(), p.skip, p.out_weight, p.out_bias, ssm_cache.data_ptr(),
                         slots.data_ptr(), out.data_ptr(), batch, width, p.channels, p.state, p.rank, p.conv_width)
        return out

    def rms_norm(self, x, weight, eps: float) -> torch.Tensor:
        """RMSNorm of the last dimension of contiguous fp32 x, as torch's rms_norm computes it."""
        out = torch.empty_like(x)
        self._rms_norm(_ptr(x), _ptr(weight), _ptr(out), x.numel() // x.shape[-1], x.shape[-1], eps)
        return out

    def silu_mul(self, gate, up) -> torch.Tensor:
        """silu(gate) * up for contiguous fp32 tensors of one shape with a multiple of 8 elements."""
        out = torch.empty_like(gate)
        self._silu_mul(_ptr(gate), _ptr(up), _ptr(out), gate.numel())
        return out

    def conv(self, x, weight, bias, conv_cache=None, slots=None) -> torch.Tensor:
        """x (B, L, I) with unit channel stride -> silu(causal depthwise conv(x) + bias) (B, L, I).

        weight (I, W) and bias (I,) contiguous; with conv_cache (S, I, W) and slots (B,), each row's last W inputs
        are stored in its slot.
        """
        batch, length, channels = x.shape
        out = torch.empty(batch, length, channels, dtype=torch.float32)
        self._conv(_ptr(x), x.stride(0), x.stride(1), _ptr(weight), _ptr(bias), _ptr(out), _ptr(conv_cache),
                   _slots_ptr(slots), batch, length, channels, weight.shape[1])
        return out

    def conv_step(self, x, weight, bias, conv_cache, slots) -> torch.Tensor:
        """x (B, I) with unit channel stride: shift each row into its slot's window; return silu(conv + bias) (B, I)."""
        batch, channels = x.shape
        out = torch.empty(batch, channels, dtype=torch.float32)
        self._conv_step(_ptr(x), x.stride(0), _ptr(weight), _ptr(bias), _ptr(out), _ptr(conv_cache),
                        _slots_ptr(slots), batch, channels, weight.shape[1])
        return out

    def scan(self, u, dbc, z, norms, eps, dt_weight, dt_bias, A, D, ssm_cache=None, slots=None,
             from_state=False, return_last_state=False):
        """The selective scan fused with the RMSNorm of dt, B and C, the dt projection, softplus, D and the gate.

        u (B, L, I) contiguous; dbc (B, L, R + 2N) contiguous, x_proj's output before the norms; z (B, L, I) with
        unit channel stride; norms the three norm weights (R,), (N,), (N,); dt_weight (I, R), dt_bias (I,),
        A (I, N) (already negative), D (I,) or None. The state starts from the slots' cached state when
        from_state, from zeros otherwise, and its last value goes back to ssm_cache (S, I, N) when given.
        Returns y (B, L, I), and the last state (B, I, N) when return_last_state.
        """
        batch, length, channels = u.shape
        state_size, rank = A.shape[1], dt_weight.shape[1]
        y = torch.empty_like(u)
        last = torch.empty(batch, channels, state_size, dtype=torch.float32) if return_last_state else None
        self._scan(_ptr(u), _ptr(dbc), _ptr(z), z.stride(0), z.stride(1), *(_ptr(w) for w in norms), eps,
                   _ptr(dt_weight), _ptr(dt_bias), _ptr(A), _ptr(D), _ptr(y), _ptr(ssm_cache), _slots_ptr(slots),
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
    """Addresses (3, E) of the experts' gate, up and down weights, mlps[e] = (gate, up, down), for the kernels.

    The addresses are valid while those weights live; callers keep the weights next to the table.
    """
    return torch.tensor([[m[i].data_ptr() for m in mlps] for i in range(3)], dtype=torch.int64)


def _ptr(tensor):
    return None if tensor is None else tensor.data_ptr()


_slots_ptr = _ptr


@functools.lru_cache(maxsize=None)
def kernels() -> Kernels | None:
    """Build (or find in torch's extension cache) and load the kernels; None, with the reason logged, on failure."""
    from torch.utils.cpp_extension import load

    if os.environ.get("JAMBA_NATIVE_KERNELS", "1") == "0":
        log.info("native CPU kernels disabled by JAMBA_NATIVE_KERNELS=0; the PyTorch path runs")
        return None
    name, flags = _arch_flags()
    # pip's ninja lives next to the interpreter, which is not on PATH when a virtual environment's python runs
    # without the environment activated.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, [bin_dir, os.environ.get("PATH")]))
    try:
        # -fopenmp makes at::parallel_for in the source run on PyTorch's OpenMP pool (the process already holds
        # the libgomp that torch ships, and the kernels link to that same library).
        path = load(name=f"jamba_mamba_cpu_{name}", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                    extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return Kernels(path)
    except Exception as error:  # a missing compiler or ninja shows up as one of several exception types
        log.warning("the native CPU kernels could not be built, the PyTorch path runs instead: %s", error)
        return None
