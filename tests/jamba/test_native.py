"""The C++ CPU kernels against the PyTorch reference, alone and inside the model."""

import pytest
import torch
import torch.nn.functional as F

from jamba import native, ssm
from jamba.generate import left_pad
from jamba.model import Jamba, JambaArgs


@pytest.fixture(scope="module")
def kernels():
    built = native.kernels()
    assert built is not None, "the native kernels did not build; the log says why"
    return built


def reference_scan(u, dbc, z, norms, eps, dt_weight, dt_bias, A, D, state=None):
    """The same computation with the PyTorch reference functions, (B, L, I) in and out."""
    rank, size = dt_weight.shape[1], A.shape[1]
    dt, B, C = torch.split(dbc, [rank, size, size], dim=-1)
    dt, B, C = (F.rms_norm(t, t.shape[-1:], w, eps) for t, w in zip((dt, B, C), norms))
    delta = (dt @ dt_weight.t()).transpose(1, 2)
    if state is None:
        y, last = ssm.selective_scan_ref(u.transpose(1, 2), delta, A, B.transpose(1, 2), C.transpose(1, 2), D,
                                         z.transpose(1, 2), dt_bias, True, return_last_state=True)
        return y.transpose(1, 2), last
    y = ssm.ssm_step(state, u[:, 0], delta[..., 0], A, B[:, 0], C[:, 0], D, z[:, 0], dt_bias, True)
    return y[:, None], state


def scan_case(batch=2, length=37, channels=64, size=16, rank=8, delta_shift=-2.0):
    xz = torch.randn(batch, length, 2 * channels)
    return dict(
        u=torch.randn(batch, length, channels),
        dbc=torch.randn(batch, length, rank + 2 * size),
        z=xz[..., channels:],  # strided like the gate half of in_proj's output
        norms=(torch.rand(rank) + 0.5, torch.rand(size) + 0.5, torch.rand(size) + 0.5),
        eps=1e-6,
        dt_weight=torch.randn(channels, rank) * 0.3,
        dt_bias=torch.randn(channels) * 0.5 + delta_shift,
        A=-torch.exp(torch.randn(channels, size)),
        D=torch.randn(channels),
    )


def test_conv_matches_reference(kernels):
    xz = torch.randn(3, 21, 96)
    x, weight, bias = xz[..., :48], torch.randn(48, 4), torch.randn(48)
    expected = ssm.causal_conv1d_ref(x.transpose(1, 2), weight, bias).transpose(1, 2)
    assert (kernels.conv(x, weight, bias) - expected).abs().max().item() < 1e-5


# From 9 rows on, CPUs with AVX-512 take the broadcast kernel, in chunks of 256 rows. 200 weight rows leave a
# partial block.
@pytest.mark.parametrize("rows", [1, 3, 8, 12, 16, 23, 40, 64, 300])
def test_small_linear_matches_torch(kernels, rows):
    x = torch.randn(rows, 2, 96)[:, 1]  # rows apart in memory, as a slice of a larger batch is
    weight, bias = torch.randn(200, 96), torch.randn(200)
    assert (kernels.linear_small(x, weight, bias) - F.linear(x, weight, bias)).abs().max().item() < 1e-4
    assert (kernels.linear_small(x, weight) - F.linear(x, weight)).abs().max().item() < 1e-4


def test_silu_mul_matches_torch(kernels):
    gate, up = torch.randn(5, 3, 64) * 30, torch.randn(5, 3, 64)
    assert (kernels.silu_mul(gate, up) - F.silu(gate) * up).abs().max().item() < 1e-4
    big = torch.randn(2, 100_000)  # split over threads
    assert (kernels.silu_mul(big, big) - F.silu(big) * big).abs().max().item() < 1e-5


@pytest.mark.parametrize("delta_shift", [-8.0, -2.0, 0.0, 6.0, 30.0])
def test_scan_matches_reference(kernels, delta_shift):
    case = scan_case(delta_shift=delta_shift)
    y, last = kernels.scan(**case, return_last_state=True)
    y_ref, last_ref = reference_scan(**case)
    scale = y_ref.abs().max().item()
    assert (y - y_ref).abs().max().item() / scale < 1e-5
    assert (last - last_ref).abs().max().item() / last_ref.abs().max().item() < 1e-5


def test_scan_without_skip_and_with_threads(kernels):
    case = scan_case(batch=3, length=300, channels=128)  # enough work to split over threads
    case["D"] = None
    torch.set_num_threads(2)
    y = kernels.scan(**case)
    y_ref, _ = reference_scan(**case)
    assert (y - y_ref).abs().max().item() / y_ref.abs().max().item() < 1e-5


# The step computes delta as one product when the rank is a multiple of 8, and a state of 16 in one vector where
# the build has AVX-512.
@pytest.mark.parametrize("rank,size", [(8, 16), (5, 8), (12, 32)])
def test_decode_steps_continue_cached_state(kernels, rank, size):
    """Prefill into slots 3 and 1 of a cache, then steps read and write those slots only."""
    case = scan_case(length=9, rank=rank, size=size)
    slots = torch.tensor([3, 1])
    ssm_cache, conv_cache = torch.zeros(5, 64, size), torch.zeros(5, 64, 4)
    xz = torch.randn(2, 12, 128)
    weight, bias = torch.randn(64, 4), torch.randn(64)
    u = kernels.conv(xz[:, :9, :64], weight, bias, conv_cache, slots)
    kernels.scan(**{**case, "u": u, "z": xz[:, :9, 64:]}, ssm_cache=ssm_cache, slots=slots)
    _, state = reference_scan(**{**case, "u": u, "z": xz[:, :9, 64:]})

    conv_full = ssm.causal_conv1d_ref(xz[..., :64].transpose(1, 2), weight, bias).transpose(1, 2)
    for t in range(9, 12):
        u_t = kernels.conv_step(xz[:, t, :64], weight, bias, conv_cache, slots)
        assert (u_t - conv_full[:, t]).abs().max().item() < 1e-5
        step = {**case, "u": u_t[:, None], "dbc": torch.randn(2, 1, case["dbc"].shape[-1]), "z": xz[:, t:t + 1, 64:]}
        y = kernels.scan(**step, ssm_cache=ssm_cache, slots=slots, from_state=True)
        y_ref, state = reference_scan(**step, state=state)
        assert (y - y_ref).abs().max().item() < 1e-4
    assert (ssm_cache[slots] - state).abs().max().item() < 1e-5
    assert ssm_cache[[0, 2, 4]].abs().max().item() == 0
    assert conv_cache[[0, 2, 4]].abs().max().item() == 0


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    native_model = Jamba(JambaArgs.from_preset("tiny"), scan="native").eval()
    reference = Jamba(JambaArgs.from_preset("tiny"), scan="ref").eval()
    reference.load_state_dict(native_model.state_dict())
    return native_model, reference


@torch.no_grad()
def test_model_with_native_kernels_matches_reference(models):
    native_model, reference = models
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (15, 4, 9)]
    ids, mask = left_pad(prompts, pad_id=0)
    assert (native_model(ids, mask).logits - reference(ids, mask).logits).abs().max().item() < 1e-4

    caches = [m.new_cache(num_slots=4, max_len=24) for m in models]
    slots = torch.tensor([2, 0, 3])
    outs = [m(ids, mask, cache=c, slots=slots, logits_to_keep=1).logits for m, c in zip(models, caches)]
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4
    for _ in range(5):
        token = outs[1][:, -1].argmax(-1, keepdim=True)
        outs = [m(token, cache=c, slots=slots).logits for m, c in zip(models, caches)]
        assert (outs[0] - outs[1]).abs().max().item() < 1e-4
    for a, b in zip(caches[0].ssm.values(), caches[1].ssm.values()):
        assert (a - b).abs().max().item() < 1e-4


def test_training_takes_the_differentiable_path(models):
    native_model, reference = models
    ids = torch.randint(3, 512, (2, 10))
    native_model.zero_grad()
    reference.zero_grad()
    native_model(ids).logits.square().mean().backward()
    reference(ids).logits.square().mean().backward()
    native_grad = native_model.model.layers[0].mamba.A_log.grad
    assert native_grad is not None
    assert (native_grad - reference.model.layers[0].mamba.A_log.grad).abs().max().item() < 1e-5


def run_batch(model, prompts, steps):
    """Logits of a left-padded prefill into slots in a scrambled order and of `steps` greedy decode steps after it."""
    ids, mask = left_pad(prompts, pad_id=0)
    cache = model.new_cache(num_slots=len(prompts) + 1, max_len=32)
    slots = torch.randperm(len(prompts) + 1, generator=torch.Generator().manual_seed(0))[: len(prompts)]
    with torch.no_grad():
        logits = [model(ids, mask, cache=cache, slots=slots, logits_to_keep=1).logits[:, -1]]
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), cache=cache, slots=slots).logits[:, -1])
    return torch.stack(logits)


def run_batch_without_kernels(monkeypatch, model, prompts, steps):
    """run_batch with every native kernel off, as on a machine where they do not build."""
    monkeypatch.setattr(native, "kernels", lambda: None)
    ssm.resolve_kernels.cache_clear()
    try:
        return run_batch(model, prompts, steps)
    finally:
        monkeypatch.undo()
        ssm.resolve_kernels.cache_clear()


@pytest.mark.parametrize("batch", [3, 20])
def test_small_batch_kernels_match_pure_pytorch(monkeypatch, batch):
    """Decode steps through the block-level kernels against the same model with every native kernel off."""
    torch.manual_seed(1)
    model = Jamba(JambaArgs.from_preset("tiny")).eval()
    prompts = [torch.randint(3, 512, (3 + i % 5,)).tolist() for i in range(batch)]
    with_kernels = run_batch(model, prompts, steps=6)
    without = run_batch_without_kernels(monkeypatch, model, prompts, steps=6)
    assert (with_kernels - without).abs().max().item() < 1e-4


def swiglu_reference(x, mlp):
    return F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)


@pytest.mark.parametrize("tokens", [5, 40])
def test_expert_and_mlp_kernels_match_pytorch_ops(kernels, tokens):
    torch.manual_seed(2)
    model = Jamba(JambaArgs.from_preset("tiny")).eval()
    layer = next(layer for layer in model.model.layers if layer.kind.has_experts)
    dense_layer = next(layer for layer in model.model.layers if not layer.kind.has_experts)
    x = torch.randn(tokens, model.args.hidden_size)
    norm, moe, k = layer.pre_ff_layernorm, layer.feed_forward, model.args.num_experts_per_tok
    with torch.no_grad():
        h = F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
        expected_logits = F.linear(h, moe.router.weight)
        weights, experts = torch.topk(torch.softmax(expected_logits, dim=-1), k, dim=-1)
        expected = torch.stack([sum(weights[t, j] * swiglu_reference(h[t], moe.experts[int(experts[t, j])])
                                    for j in range(k)) for t in range(tokens)])
        mlps = [e.plain_weights() for e in moe.experts]
        out, logits = kernels.moe_block(x, norm, moe.router.weight, k, native.expert_table(mlps),
                                        (len(mlps), mlps[0][0].shape[0]))
        assert (logits - expected_logits).abs().max().item() < 1e-5
        assert (out - (x + expected)).abs().max().item() < 1e-5

        mlp = dense_layer.feed_forward
        assert (kernels.mlp_small(x, *mlp.plain_weights()) - swiglu_reference(x, mlp)).abs().max().item() < 1e-5


def test_block_kernels_follow_replaced_parameters(monkeypatch):
    """The parameters gathered for a block are gathered again when a module gets new ones."""
    torch.manual_seed(3)
    model = Jamba(JambaArgs.from_preset("tiny")).eval()
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (6, 4, 2)]
    before = run_batch(model, prompts, steps=3)
    for layer in model.model.layers:
        if layer.kind.mixer == "mamba":
            layer.mamba.in_proj.weight = torch.nn.Parameter(layer.mamba.in_proj.weight.detach() * 0.5)
        layer.pre_ff_layernorm.weight = torch.nn.Parameter(layer.pre_ff_layernorm.weight.detach() * 2)
    after = run_batch(model, prompts, steps=3)
    expected = run_batch_without_kernels(monkeypatch, model, prompts, steps=3)
    assert (after - before).abs().max().item() > 1e-2
    assert (after - expected).abs().max().item() < 1e-4
