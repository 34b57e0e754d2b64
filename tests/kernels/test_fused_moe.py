"""Fused MoE: the torch twin (kernels/reference_moe.fused_moe) against a per-token loop written
here, and the Triton kernel (kernels/triton/fused_moe.py) against the twin, under
TRITON_INTERPRET=1 at tiny shapes (tests/kernels/conftest.py sets it without a GPU): ragged H and
I tails, several K steps, experts that receive no token, one token, more tokens than one block.
The `gpu` tests repeat the check at Mixtral-8x7B and Qwen3-30B-A3B expert shapes in bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels.reference_moe import fused_moe as twin
from pagedserve.kernels.registry import TORCH_KERNELS
from pagedserve.model_executor.layers.moe import route_topk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _case(t: int, h: int, inter: int, e: int, k: int, *, dead: tuple[int, ...] = (), seed: int = 0,
          dtype: torch.dtype = torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * inter, h, generator=g) * h**-0.5
    w2 = torch.randn(e, h, inter, generator=g) * inter**-0.5
    logits = torch.randn(t, e, generator=g)
    logits[:, list(dead)] = -1e4  # these experts receive no token
    weights, ids = route_topk(logits, k, renormalize=True)
    cast = [a.to(device=device, dtype=dtype) for a in (x, w13, w2)]
    return (*cast, weights.to(device), ids.to(device))


def _per_token(x, w13, w2, weights, ids):
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            act = F.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])
            out[t] += weights[t, j] * (w2[e] @ act)
    return out


def test_twin_matches_per_token_loop_and_is_the_torch_set_entry() -> None:
    assert TORCH_KERNELS.fused_moe is twin
    args = _case(9, 24, 20, 5, 2, dead=(3,))
    torch.testing.assert_close(twin(*args), _per_token(*args), rtol=1e-5, atol=1e-5)
    empty = twin(torch.zeros(0, 24), *args[1:3], torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long))
    assert empty.shape == (0, 24)


def test_route_topk_renormalizes_only_when_asked() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    probs = torch.softmax(logits, -1)
    w, ids = route_topk(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(w, probs[:, [0, 2]])
    w, _ = route_topk(logits, 2, renormalize=True)
    torch.testing.assert_close(w, probs[:, [0, 2]] / probs[:, [0, 2]].sum())


def test_sort_by_expert_groups_and_pads() -> None:
    pytest.importorskip("triton")
    from pagedserve.kernels.triton.fused_moe import sort_by_expert

    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 gets nothing
    sorted_ids, block_expert = sort_by_expert(ids, 4, block_m=4)
    n = ids.numel()
    assert sorted_ids.numel() == block_expert.numel() * 4 >= n + 4 * 3
    flat = ids.flatten()
    used = [b for b in range(block_expert.numel()) if block_expert[b] >= 0]
    assert [int(block_expert[b]) for b in used] == [0, 2, 3]  # no block for expert 1
    seen = []
    for b in used:
        rows = sorted_ids[4 * b: 4 * b + 4].tolist()
        real = [r for r in rows if r != n]
        assert all(int(flat[r]) == int(block_expert[b]) for r in real)
        seen += real
    assert sorted(seen) == list(range(n))  # every (token, slot) pair exactly once
    assert all(int(r) == n for b in range(block_expert.numel()) if block_expert[b] < 0
               for r in sorted_ids[4 * b: 4 * b + 4])


@pytest.mark.parametrize(("t", "h", "inter", "e", "k", "dead"), [
    (1, 32, 16, 4, 2, ()),  # one token: two experts used, two receive nothing
    (5, 40, 24, 6, 2, (1, 4)),  # ragged H and I tails, dead experts
    (37, 72, 80, 8, 3, (0, 7)),  # several M blocks per expert, K loops of 2 tiles
])
def test_triton_matches_twin(t, h, inter, e, k, dead) -> None:
    pytest.importorskip("triton")
    from pagedserve.kernels.triton.fused_moe import fused_moe

    args = _case(t, h, inter, e, k, dead=dead, seed=t)
    assert all(int((args[4] == d).sum()) == 0 for d in dead)
    torch.testing.assert_close(fused_moe(*args), twin(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_matches_float32_twin(dtype) -> None:
    pytest.importorskip("triton")
    from pagedserve.kernels.triton.fused_moe import fused_moe

    args = _case(20, 48, 40, 5, 2, dead=(2,), seed=4, dtype=dtype)
    got = fused_moe(*args)
    ref = twin(*[a.float() if a.is_floating_point() else a for a in args])
    assert got.dtype == dtype
    # inputs are the same rounded values; the kernel rounds the SiLU product and the output
    assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_triton_set_has_the_kernel() -> None:
    pytest.importorskip("triton")
    from pagedserve.kernels.registry import get_kernel_set
    from pagedserve.kernels.triton.fused_moe import fused_moe

    assert get_kernel_set("triton").fused_moe is fused_moe


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(4096, 14336, 8, 2), (2048, 768, 128, 8)],
                         ids=["mixtral-8x7b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("t", [1, 16, 257])
def test_gpu_real_shapes_bf16(shape, t) -> None:
    from pagedserve.kernels.triton.fused_moe import fused_moe

    h, inter, e, k = shape
    args = _case(t, h, inter, e, k, dead=(e - 1,), seed=t, dtype=torch.bfloat16, device=DEVICE)
    got = fused_moe(*args)
    ref = twin(*[a.float() if a.is_floating_point() else a for a in args])
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert got.dtype == torch.bfloat16 and err < 2e-2


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_model_with_triton_moe_matches_torch_set(arch, tmp_path) -> None:
    """The tiny MoE checkpoints (tests/models/families/test_moe.py) with only fused_moe swapped
    for the Triton kernel: the same logits through prefill, a mixed batch and decode steps."""
    pytest.importorskip("triton")
    import dataclasses

    from pagedserve.kernels.triton.fused_moe import fused_moe
    from pagedserve.model_executor.loader import load_model
    from tests.models.families.test_moe import build_moe_checkpoint
    from tests.models.test_model_parity import PagedHarness

    path = build_moe_checkpoint(tmp_path / arch, arch)
    triton_set = dataclasses.replace(TORCH_KERNELS, name="torch+triton-moe", fused_moe=fused_moe)
    a = [int(i) for i in torch.randint(10, 500, (14,), generator=torch.Generator().manual_seed(3))]
    b = a[:5] + a[9:]
    steps = [[("a", a, 0, 9)], [("a", a, 9, 12), ("b", b, 0, 9)], [("a", a, 12, 13), ("b", b, 9, 10)]]
    logits = []
    for kernels in (None, triton_set):
        model = load_model(path, torch.float32, "cpu", show_progress=False, kernels=kernels).model
        harness = PagedHarness(model, num_blocks=8)
        logits.append([harness.step(chunk) for chunk in steps])
    for want, got in zip(*logits, strict=True):
        for req in want:
            torch.testing.assert_close(got[req], want[req], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_triton_matches_twin_at_every_row_block(block_m) -> None:
    """Each row block (the sort's padding unit) and narrow / wide tiles give the twin's result."""
    pytest.importorskip("triton")
    from pagedserve.kernels.triton.fused_moe import fused_moe
    from pagedserve.kernels.triton.moe_config import GemmTiles, MoeConfig

    args = _case(45, 40, 72, 6, 2, dead=(3,), seed=block_m)
    for up, down in [(GemmTiles(16, 16), GemmTiles(32, 64)), (GemmTiles(64, 32), GemmTiles(16, 16))]:
        got = fused_moe(*args, config=MoeConfig(block_m, up, down))
        torch.testing.assert_close(got, twin(*args), rtol=1e-5, atol=1e-5)


def test_heuristic_tiles_follow_rows_per_expert_and_fit_the_matrix() -> None:
    from pagedserve.kernels.triton.moe_config import heuristic_config

    decode = heuristic_config(1, 8, 2, 4096, 14336)
    prefill = heuristic_config(4096, 8, 2, 4096, 14336)
    assert decode.block_m == 16 and prefill.block_m == 64
    assert decode.down.block_n <= decode.gate_up.block_n  # more programs for the down GEMM at decode
    tiny = heuristic_config(4096, 4, 2, 24, 16)
    assert tiny.gate_up.block_n == 16 and tiny.gate_up.block_k == 32  # capped at the dims (>= 16)
    assert tiny.down.block_n == 32 and tiny.down.block_k == 16


def test_tuned_table_nearest_token_count(tmp_path, monkeypatch) -> None:
    """A table written as benchmarks/tune_moe.py writes it, found in $PAGEDSERVE_MOE_CONFIG_DIR,
    gives the entry of the nearest measured token count."""
    import json

    import pagedserve.kernels.triton.moe_config as mc

    def entry(bm: int) -> dict:
        return mc.MoeConfig(bm, mc.GemmTiles(64, 128, 4, 4), mc.GemmTiles(32, 64, 8, 3)).to_json()

    name = mc.config_file_name(8, 4096, 14336, 2, torch.bfloat16, "NVIDIA H200")
    assert name == "E=8,H=4096,I=14336,K=2,dtype=bfloat16,device=NVIDIA_H200.json"
    (tmp_path / name).write_text(json.dumps({"1": entry(16), "64": entry(32), "1024": entry(64)}))
    monkeypatch.setenv("PAGEDSERVE_MOE_CONFIG_DIR", str(tmp_path))
    mc._tuned_table.cache_clear()
    try:
        picks = {t: mc.tuned_config(name, t) for t in (1, 20, 40, 500, 600, 99999)}
        assert {t: c.block_m for t, c in picks.items() if c} == {1: 16, 20: 16, 40: 32, 500: 32, 600: 64, 99999: 64}
        assert picks[1] == mc.MoeConfig.from_json(entry(16))
        assert picks[1].down == mc.GemmTiles(32, 64, 8, 3)
        assert mc.tuned_config("E=1,missing.json", 4) is None
    finally:
        mc._tuned_table.cache_clear()


def _shipped_tables() -> list:
    from pagedserve.kernels.triton.moe_config import TUNED_DIR

    return sorted(TUNED_DIR.glob("*.json"))


@pytest.mark.parametrize("path", _shipped_tables(), ids=lambda p: p.name)
def test_shipped_tuned_tables_parse_and_every_entry_computes_the_twin(path) -> None:
    """Each table benchmarks/tune_moe.py measured and we ship: token-count keys, tiles that
    tl.dot accepts (powers of two >= 16), and each distinct entry gives the twin's result."""
    pytest.importorskip("triton")
    import json

    from pagedserve.kernels.triton.fused_moe import fused_moe
    from pagedserve.kernels.triton.moe_config import MoeConfig

    raw = json.loads(path.read_text())
    assert raw and all(int(k) > 0 for k in raw)
    configs = {MoeConfig.from_json(v) for v in raw.values()}
    args = _case(9, 32, 48, 4, 2, dead=(1,), seed=3)
    for cfg in configs:
        for tiles in (cfg.gate_up, cfg.down):
            for dim in (cfg.block_m, tiles.block_n, tiles.block_k):
                assert dim >= 16 and dim & (dim - 1) == 0
            assert tiles.num_warps in (1, 2, 4, 8, 16) and 1 <= tiles.num_stages <= 8
        torch.testing.assert_close(fused_moe(*args, config=cfg), twin(*args), rtol=1e-5, atol=1e-5)
