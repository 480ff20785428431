"""Our cuSPARSELt binding and plan cache (``serving.cslt_plans``). Here, without a GPU: the library loads (the
nvidia-cusparselt wheel ``make install`` puts beside the CPU torch, the version PyTorch's CUDA builds load),
every function we declare resolves, a failing call raises the library's own error name, and the cache keys
and evicts as it says. On a GPU: our plans give PyTorch's cuSPARSELt product bit for bit, and FP8's."""

import pytest
import torch

from serving import cslt_plans
from serving.cslt_plans import CusparseLtError, PlanCache, PlanKey

from .interpreter import sparse_weight


def _library_or_skip():
    try:
        return cslt_plans.library()
    except CusparseLtError as err:
        pytest.skip(f"{err} (make install installs nvidia-cusparselt-cu13)")


def test_the_library_loads_and_every_function_we_call_resolves():
    lib = _library_or_skip()
    assert lib.path.endswith(cslt_plans.SONAME) or "already loaded" in lib.path
    for name in cslt_plans.SIGNATURES:
        assert getattr(lib.dll, name).argtypes == cslt_plans.SIGNATURES[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the handle initialises (the GPU test)")
def test_a_failing_call_raises_the_librarys_own_error():
    """Without a GPU, cusparseLtInit fails: its status comes back named by the library, not as a crash."""
    lib = _library_or_skip()
    with pytest.raises(CusparseLtError, match=r"cusparseLtInit failed: CUSPARSE_STATUS_\w+ \("):
        lib.call("cusparseLtInit", cslt_plans._opaque())
    assert cslt_plans.available() == (False, "no CUDA GPU")


def test_a_plan_key_is_what_a_plan_depends_on_and_refuses_what_no_plan_takes():
    key = PlanKey(0, torch.bfloat16, torch.bfloat16, 14336, 4096, 32, alg_id=1)
    assert key == PlanKey(0, torch.bfloat16, torch.bfloat16, 14336, 4096, 32, 1)  # the same plan, whatever layer
    assert key != PlanKey(0, torch.bfloat16, torch.bfloat16, 14336, 4096, 48, 1)
    with pytest.raises(ValueError, match="padded to 16"):
        PlanKey(0, torch.float16, torch.float16, 64, 64, 20)
    with pytest.raises(ValueError, match="fp16/bf16/FP8 inputs and a 16-bit output"):
        PlanKey(0, torch.float32, torch.float32, 64, 64, 16)


class _Built:
    def __init__(self, key, destroyed):
        self.key, self.destroyed = key, destroyed

    def destroy(self):
        self.destroyed.append(self.key)


def test_the_cache_builds_on_a_miss_keeps_the_most_recently_used_and_destroys_what_it_evicts():
    destroyed = []
    cache = PlanCache(capacity=2)
    build = lambda key: _Built(key, destroyed)  # noqa: E731
    first = cache.get("a", build)
    cache.get("b", build)
    assert cache.get("a", build) is first  # a hit: "a" is now the most recently used
    cache.get("c", build)  # over capacity: "b", the least recently used, goes
    assert cache.keys() == ["a", "c"] and destroyed == ["b"]
    assert cache.info() == {"plans": 2, "capacity": 2, "hits": 1, "misses": 3, "evictions": 1}
    with pytest.raises(ValueError, match="at least one plan"):
        PlanCache(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with cuSPARSELt")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_our_plans_give_pytorchs_cusparselt_product_bit_for_bit(dtype):
    weight = sparse_weight(512, 1024, dtype).cuda()
    compressed = torch._cslt_compress(weight)
    before = cslt_plans.PLANS.info()["misses"]
    for m in (1, 17, 256, 256):  # the second 256 is a hit
        x = torch.randn(m, 1024, device="cuda", dtype=dtype)
        padded = torch.nn.functional.pad(x, (0, 0, 0, (-m) % 16))
        theirs = torch._cslt_sparse_mm(compressed, padded.t(), transpose_result=True)[:m]
        ours = cslt_plans.sparse_mm(compressed, x, 512)
        assert torch.equal(ours, theirs), m
    assert cslt_plans.PLANS.info()["misses"] - before == 3


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="FP8 cuSPARSELt needs sm90"
)
def test_fp8_scales_in_the_epilogue_and_one_output_pass_give_the_w8a8_product():
    from serving.sparse_op import quantize_tokens

    weight = sparse_weight(256, 512, torch.float32)
    scale_w = weight.abs().amax(1) / 448
    w_q = (weight / scale_w[:, None]).to(torch.float8_e4m3fn).cuda()
    x_q, scale_x = quantize_tokens(torch.randn(40, 512, device="cuda").to(torch.bfloat16))
    bias = torch.randn(256, device="cuda").to(torch.bfloat16)
    out = cslt_plans.sparse_mm(torch._cslt_compress(w_q), x_q, 256, bias=bias, scale_w=scale_w.cuda(), scale_x=scale_x)
    reference = (x_q.double() @ w_q.double().T) * scale_x.double()[:, None] * scale_w.cuda().double() + bias.double()
    assert out.dtype == torch.bfloat16
    assert float((out.double() - reference).norm() / reference.norm()) < 1e-2
