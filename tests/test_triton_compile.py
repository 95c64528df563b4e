"""Every Triton kernel variant the launch spec can produce compiles for sm_80 and sm_90.

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` runs the ``ptxas`` shipped in
the triton wheel. The interpreter (``TRITON_INTERPRET=1``, tests/test_triton.py) accepts
code that the real compiler refuses, so this is the check that the CUDA path exists.
A register spill (stack or local memory in ``cuobjdump --dump-resource-usage``) fails
too: spilled kernels run from local memory, far below the bandwidth they are built for.

By default: the launch spec's enumeration, and a representative subset of the variants
(each kernel's largest tile for sm_80 and sm_90, then every code path of every kernel
once: ``aot_compile.representative_jobs``), for each kernel family (the default launch
spec's, the flat kernels'). ``--runslow`` adds the full sweep, every variant for both
targets (tens of minutes on 2 cores).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the triton extra is not installed")

import aot_compile  # noqa: E402  (tests/ is on sys.path: see tests/conftest.py)


def test_launch_spec_variants_cover_every_kernel_and_dtype():
    import torch

    from distk.selection import triton_kernel as tk

    variants = list(tk.all_launch_variants())
    kernels = {v.kernel for v in variants}
    assert kernels == set(tk.KERNELS), kernels
    for kernel in ("compact", "stream", "floor", "filter", "redo_buckets", "redo_rows", "row"):
        assert {v.dtype for v in variants if v.kernel == kernel} == set(tk.INPUT_DTYPES)
    # Every launch the spec plans for some typical calls is one of the enumerated variants.
    known = {v.variant() for v in variants}
    for args in [(256, 1 << 20, 388, 6, True, True, True, 132, 5.3, torch.float16),
                 (1, 1 << 26, 1048, 64, True, True, True, 132, 280.0, torch.float32),
                 (4096, 32768, 99, 2, True, True, False, 132, None, torch.bfloat16),
                 (3, 5000, 7, 1000, False, False, False, 132, None, torch.float32)]:
        for launch in tk.plan_launches(*args).launches:
            assert launch.variant() in known, launch


def test_select_writes_every_kept_slot_of_every_plan():
    # select writes slots j < min(M_P2, kept) of each bucket: a sort narrower than kept
    # leaves slots of a torch.empty output unwritten (issue 22: n = 2^20, k = 1024,
    # b = 1000, k_b = 200 planned lists of 64 keys for kept = 200). Walks the launch spec
    # over the shapes of all_launch_variants and the case.
    import itertools

    from distk.selection import triton_kernel as tk

    above_per_bucket = 4.85  # distk.topk's floor for the case: 1049 * 0.00462
    plan = tk.plan_launches(1, 1 << 20, 1000, 200, True, True, True, 132, above_per_bucket)
    select = dict(plan.launches[-1].constexprs)
    assert plan.path == "compact" and select["M_P2"] >= 200, plan
    assert plan.launches[-1].variant() in {v.variant() for v in tk.all_launch_variants()}
    for length, kept, buckets, has_floor, above in itertools.product(
            (3, 64, 1000, 1049, 5000), (1, 5, 16, 17, 64, 100, 200, 1000), (7, 1000),
            (True, False), (None, 1.0, 4.85, 200.0)):
        if kept > length:
            continue
        plan = tk.plan_launches(1, length * buckets, buckets, kept, True, True, has_floor,
                                132, above)
        for launch in plan.launches:
            if launch.kernel == "select":
                assert dict(launch.constexprs)["M_P2"] >= kept, (length, kept, plan)


def _assert_compiled_without_spills(rows: list[dict]) -> None:
    print("\n" + aot_compile.format_rows(rows))
    errors = [r for r in rows if "error" in r]
    assert not errors, errors[:3]
    spills = [r for r in rows if r["stack"] or r["local"]]
    assert not spills, aot_compile.format_rows(spills)
    assert {r["sm"] for r in rows} == {80, 90}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", aot_compile.FAMILIES)
def test_representative_variants_compile_for_sm80_and_sm90_without_spills(family):
    # One test per kernel family (the default launch spec's, the flat kernels'), each
    # within its own timeout.
    from distk.selection import triton_kernel as tk

    jobs = aot_compile.representative_jobs(family)
    variants = list(tk.all_launch_variants())
    family_variants = [variants[index] for index, _ in aot_compile.jobs(family)]
    chosen = [variants[index] for index, _ in jobs]
    # Every kernel of the family, and every dtype, bool constexpr and SOURCE of each.
    assert {v.kernel for v in chosen} == {v.kernel for v in family_variants}
    assert set().union(*map(aot_compile._branches, chosen)) == \
        set().union(*map(aot_compile._branches, family_variants))
    _assert_compiled_without_spills(aot_compile.compile_all(selected=jobs))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("family", aot_compile.FAMILIES)
def test_every_variant_compiles_for_sm80_and_sm90_without_spills(family):
    _assert_compiled_without_spills(aot_compile.compile_all(family=family))
