"""Every scan path against the reference loop."""

import pytest
import torch

from jamba import ssm

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def scan_inputs(batch=2, channels=32, length=70, state=8, dtype=torch.float32, delta_shift=-2.0):
    u = torch.randn(batch, channels, length).to(dtype)
    delta = (torch.randn(batch, channels, length) + delta_shift).to(dtype)
    A = -torch.exp(torch.randn(channels, state))
    B = torch.randn(batch, state, length).to(dtype)
    C = torch.randn(batch, state, length).to(dtype)
    D = torch.randn(channels)
    z = torch.randn(batch, channels, length).to(dtype)
    delta_bias = torch.randn(channels) * 0.5
    return u, delta, A, B, C, D, z, delta_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta_shift", [-4.0, 0.0, 6.0])
def test_chunked_scan_matches_reference(dtype, delta_shift):
    u, delta, A, B, C, D, z, bias = scan_inputs(dtype=dtype, delta_shift=delta_shift)
    y_ref, state_ref = ssm.selective_scan_ref(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    y, state = ssm.selective_scan_chunked(u, delta, A, B, C, D, z, bias, True, return_last_state=True)

    scale = y_ref.float().abs().max().item()
    y_diff = (y.float() - y_ref.float()).abs().max().item() / scale
    state_diff = (state - state_ref).abs().max().item() / state_ref.abs().max().item()
    assert y.dtype == dtype and state.dtype == torch.float32
    assert y_diff < TOLERANCE[dtype], f"relative output difference {y_diff}"
    assert state_diff < 1e-4, f"relative state difference {state_diff}"


def test_fast_decay_stays_finite():
    u, delta, A, B, C, D, z, bias = scan_inputs(delta_shift=60.0)
    y = ssm.selective_scan_chunked(u, delta, A * 50, B, C, D, z, bias, True)
    assert torch.isfinite(y).all()


def test_step_continues_the_scan():
    u, delta, A, B, C, D, z, bias = scan_inputs(length=12)
    y_ref, _ = ssm.selective_scan_ref(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    _, state = ssm.selective_scan_ref(u[..., :8], delta[..., :8], A, B[..., :8], C[..., :8], D, z[..., :8], bias,
                                      True, return_last_state=True)
    for t in range(8, 12):
        y = ssm.ssm_step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
        diff = (y - y_ref[..., t]).abs().max().item()
        assert diff < 1e-5, f"step {t}: max difference {diff}"


def test_conv_step_continues_the_conv():
    x = torch.randn(2, 6, 10)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    full = ssm.causal_conv1d_ref(x, weight, bias)
    window = torch.nn.functional.pad(x[..., :7], (0, 0))[..., -4:].clone()
    for t in range(7, 10):
        out = ssm.causal_conv1d_step(window, x[..., t], weight, bias)
        assert (out - full[..., t]).abs().max().item() < 1e-6


def test_auto_picks_native_path_on_cpu():
    assert ssm.resolve_kernels("auto", "cpu").name == "native"


def test_auto_falls_back_to_torch(monkeypatch):
    from jamba import native

    monkeypatch.setattr(native, "kernels", lambda: None)
    ssm.resolve_kernels.cache_clear()
    try:
        assert ssm.resolve_kernels("auto", "cpu").name == "torch"
        with pytest.raises(RuntimeError, match="scan='native' needs the C\\+\\+ kernels"):
            ssm.resolve_kernels("native", "cpu")
    finally:
        ssm.resolve_kernels.cache_clear()


def test_cuda_path_on_cpu_is_rejected():
    with pytest.raises(ValueError, match="scan='cuda' needs a CUDA device"):
        ssm.resolve_kernels("cuda", "cpu")


def test_native_path_off_cpu_is_rejected():
    with pytest.raises(ValueError, match="scan='native' runs on the CPU only"):
        ssm.resolve_kernels("native", "cuda")


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="scan must be one of"):
        ssm.resolve_kernels("fast", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with mamba-ssm kernels")
def test_cuda_kernels_match_reference():
    kernels = ssm.resolve_kernels("cuda", "cuda")
    inputs = [t.cuda() for t in scan_inputs()]
    y_ref, state_ref = ssm.selective_scan_ref(*inputs, True, return_last_state=True)
    y, state = kernels.scan(*inputs, True, return_last_state=True)
    assert (y - y_ref).abs().max().item() < 1e-3
    assert (state - state_ref).abs().max().item() < 1e-3
