"""Selective-scan math of the Mamba mixer: a reference scan, fast paths with the same signature, and the one-token
update used when decoding.

Legend: B batch, I mixer channels (mamba_expand * hidden_size), L sequence, N d_state, W conv width (d_conv).

Every scan takes the arguments of mamba-ssm's `selective_scan_fn`:
    u      (B, I, L)  input after the causal conv
    delta  (B, I, L)  time step before `delta_bias` and softplus
    A      (I, N)     negative real state matrix (-exp(A_log))
    B, C   (B, N, L)  input and output projections
    D      (I,)       skip connection, or None
    z      (B, I, L)  gate, multiplied in as silu(z), or None
and returns y (B, I, L) in the dtype of u, plus the last state (B, I, N) in fp32 when `return_last_state`.
The state is always kept in fp32, whatever the dtype of the activations.

Paths, chosen once per device by `resolve_kernels`:
- "ref": a plain loop over time (`selective_scan_ref`); the yardstick for the others.
- "torch": a chunked scan in PyTorch (`selective_scan_chunked`).
- "native": the fast path on CPU. For inference in fp32 the mixer hands the conv and the scan with its
  surroundings to the C++ kernels of `jamba.native` (one call each); where those do not apply (training, other
  dtypes, adapters on dt_proj) it runs the "torch" functions below.
- "cuda": mamba-ssm's fused kernels (`selective_scan_fn`, `selective_state_update`) and causal-conv1d's.
"""

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SCAN_SETTINGS = ("auto", "ref", "torch", "native", "cuda")

# exp(x) overflows fp32 above ~88; the chunked scan keeps every exponent under this bound.
_MAX_EXPONENT = 60.0


def _discretize_inputs(u, delta, A, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.float(), delta, A.float()


def _finish(y, u, D, z, dtype):
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Run the selective scan one step at a time, in fp32 (see the module docstring for shapes).

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   y_t = C_t . h_t + D * u_t
    """
    dtype = u.dtype
    u, delta, A = _discretize_inputs(u, delta, A, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    B, C = B.float(), C.float()

    state = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)  # (B, I, N)
        dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        state = dA * state + dBu
        ys.append(torch.einsum("bin,bn->bi", state, C[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, channels, 0)

    y = _finish(y, u, D, z, dtype)
    return (y, state) if return_last_state else y


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk_size=32):
    """Run the selective scan in chunks of time steps, each solved in closed form (see the module docstring).

    Inside a chunk that starts from state h0, with a_t = delta_t * A and S_t = a_1 + ... + a_t (S_t <= 0):
        h_t = exp(S_t) * (h0 + sum_{s<=t} exp(-S_s) * delta_s * B_s * u_s)
    which is two cumulative sums instead of a loop. exp(-S_s) grows with the chunk length, so the chunk is cut
    short enough that no exponent exceeds 60; a model whose time steps decay very fast gets short chunks and runs
    at the speed of the reference loop, never with a wrong result.
    """
    dtype = u.dtype
    u, delta, A = _discretize_inputs(u, delta, A, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    Bt = B.float().transpose(1, 2)[:, None]  # (B, 1, L, N)
    Ct = C.float().transpose(1, 2)[:, None]  # (B, 1, L, N)

    max_decay_per_step = float(delta.detach().max()) * float((-A).detach().max()) if length else 0.0
    if max_decay_per_step > 0:
        chunk_size = min(chunk_size, int(_MAX_EXPONENT / max_decay_per_step))
    if chunk_size <= 1:
        return selective_scan_ref(u.to(dtype), delta, A, B, C, D, z, None, False, return_last_state)

    state = u.new_zeros(batch, channels, A.shape[1])
    y = torch.empty_like(u)
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        d = delta[:, :, start:end]  # (B, I, T)

        decay = torch.cumsum(d[..., None] * A[:, None, :], dim=2)  # (B, I, T, N)
        inputs = (d * u[:, :, start:end])[..., None] * Bt[:, :, start:end]
        states = torch.exp(decay) * (state[:, :, None] + torch.cumsum(torch.exp(-decay) * inputs, dim=2))

        y[:, :, start:end] = (states * Ct[:, :, start:end]).sum(-1)
        state = states[:, :, -1]

    y = _finish(y, u, D, z, dtype)
    return (y, state) if return_last_state else y


def ssm_step(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Advance the state by one token, in place, and return the output.

    state (B, I, N) fp32, updated in place; x, delta, z (B, I); A (I, N); B, C (B, N); D, delta_bias (I,).
    Returns y (B, I) in the dtype of x.
    """
    dtype = x.dtype
    xf, delta, A = _discretize_inputs(x[..., None], delta[..., None], A, delta_bias, delta_softplus)
    xf, delta = xf[..., 0], delta[..., 0]
    dA = torch.exp(delta[..., None] * A)  # (B, I, N)
    dBx = (delta * xf)[..., None] * B.float()[:, None, :]
    state.mul_(dA).add_(dBx)
    y = torch.einsum("bin,bn->bi", state, C.float())
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def causal_conv1d_ref(x, weight, bias=None):
    """Depthwise causal convolution with SiLU: x (B, I, L), weight (I, W), bias (I,) -> (B, I, L)."""
    width = weight.shape[1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=x.shape[1])
    return F.silu(out[..., : x.shape[-1]])


def causal_conv1d_step(conv_state, x, weight, bias=None):
    """Shift x (B, I) into conv_state (B, I, W), in place, and return SiLU(conv) for that token (B, I)."""
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x[:, :, None]], dim=-1))
    out = torch.einsum("biw,iw->bi", conv_state, weight)
    if bias is not None:
        out = out + bias
    return F.silu(out)


@dataclass(frozen=True)
class ScanKernels:
    """The functions one Mamba mixer calls, all from one path."""

    name: str
    scan: Callable
    step: Callable
    conv: Callable
    conv_step: Callable
    native: object = None  # jamba.native.Kernels, for the mixer's fused CPU path


def _cuda_kernels() -> ScanKernels:
    """Wrap mamba-ssm's and causal-conv1d's CUDA kernels; raises ImportError when they cannot be imported."""
    # NOTE: written against mamba-ssm 2.x and causal-conv1d 1.x signatures but not yet run on a GPU;
    # tests/jamba/test_ssm.py::test_cuda_kernels_match_reference is the check to run first.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        out = selective_scan_fn(u, delta, A.float(), B, C, D.float() if D is not None else None, z,
                                delta_bias.float() if delta_bias is not None else None, delta_softplus,
                                return_last_state)
        if return_last_state:
            y, last = out
            return y, last.float()
        return out

    def step(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        # selective_state_update updates `state` in place and keeps it in its own (fp32) dtype.
        return selective_state_update(state, x, delta, A.float(), B, C, D, z=z, dt_bias=delta_bias,
                                      dt_softplus=delta_softplus)

    def conv(x, weight, bias=None):
        return causal_conv1d_fn(x, weight, bias, activation="silu")

    def conv_step(conv_state, x, weight, bias=None):
        return causal_conv1d_update(x, conv_state, weight, bias, activation="silu")

    return ScanKernels("cuda", scan, step, conv, conv_step)


REF_KERNELS = ScanKernels("ref", selective_scan_ref, ssm_step, causal_conv1d_ref, causal_conv1d_step)
TORCH_KERNELS = ScanKernels("torch", selective_scan_chunked, ssm_step, causal_conv1d_ref, causal_conv1d_step)


def _native_kernels() -> ScanKernels | None:
    from jamba import native

    built = native.kernels()
    return None if built is None else ScanKernels("native", selective_scan_chunked, ssm_step, causal_conv1d_ref,
                                                  causal_conv1d_step, built)


@functools.lru_cache(maxsize=None)
def resolve_kernels(setting: str, device_type: str) -> ScanKernels:
    """Pick the scan path for `setting` on a device type and log the choice once.

    "auto" takes mamba-ssm's kernels on CUDA when they import, the native kernels on CPU when they build, and the
    PyTorch chunked scan otherwise; asking for "cuda" or "native" where they cannot run raises.
    """
    if setting not in SCAN_SETTINGS:
        raise ValueError(f"scan must be one of {SCAN_SETTINGS}, got {setting!r}")

    if setting == "native" and device_type != "cpu":
        raise ValueError(f"scan='native' runs on the CPU only, but the model is on {device_type!r}; "
                         "use scan='auto' to pick the path for that device")

    if setting == "ref":
        kernels, reason = REF_KERNELS, "requested"
    elif setting == "torch":
        kernels, reason = TORCH_KERNELS, "requested"
    elif device_type != "cuda":
        if setting == "cuda":
            raise ValueError(f"scan='cuda' needs a CUDA device, but the model is on {device_type!r}")
        native = _native_kernels() if device_type == "cpu" else None
        if native is not None:
            kernels, reason = native, "requested" if setting == "native" else "the C++ kernels built"
        elif setting == "native":
            raise RuntimeError("scan='native' needs the C++ kernels of jamba.native, which failed to build (the "
                               "logged warning has the error); install a C++ compiler and ninja, or use scan='auto'")
        else:
            kernels, reason = TORCH_KERNELS, f"device is {device_type}, no native kernels"
    else:
        try:
            kernels, reason = _cuda_kernels(), "mamba-ssm and causal-conv1d kernels imported"
        except ImportError as error:
            if setting == "cuda":
                raise ImportError(
                    "scan='cuda' needs the mamba-ssm and causal-conv1d CUDA kernels: "
                    "pip install 'jamba-ray[gpu]' on a machine with the CUDA toolkit "
                    f"({error})"
                ) from error
            kernels, reason = TORCH_KERNELS, f"mamba-ssm kernels unavailable ({error})"

    log.info("selective scan on %s: %s path (%s)", device_type, kernels.name, reason)
    return kernels
