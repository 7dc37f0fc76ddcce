"""Nanoseconds per element of one ordinary step (no refresh) of ``Anon``'s fp32 C++ kernel, called directly, against
torch's fused AdamW op (``torch._fused_adamw_``) on the same sizes in the same run: a size whose five tensors sit in
the core's L2 cache (arithmetic shows) and one far larger than the last-level cache (memory traffic shows).

Both run on one fp32 tensor with the class defaults (``Anon``: gamma 1, the ``max_precond_ratio`` limit and the
late-seen rule; AdamW: torch's defaults), ``v`` set so that the limit binds nowhere, as between refreshes of a run with
steady gradients. Thread CPU time, rounds alternating between the two, median per size.

    OMP_NUM_THREADS=1 python benchmarks/kernel_ns_per_element.py
    ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 python benchmarks/kernel_ns_per_element.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anon_hf.backends import cpu_kernel  # noqa: E402
from anon_hf.backends.fused.kernel import KernelCall  # noqa: E402
from anon_hf.backends.fused.scalars import step_scalars_from  # noqa: E402
from anon_hf.hyper import DEFAULTS, update_kwargs  # noqa: E402
from anon_hf.refresh import step_rule  # noqa: E402


def anon_call(numel: int) -> Callable[[], None]:
    """One ordinary step of the fp32 kernel at Anon's defaults on ``numel`` elements (the kernel's own call,
    :class:`anon_hf.backends.fused.kernel.KernelCall`; its step counter is not reset, so it keeps stepping ordinarily)."""
    torch.manual_seed(0)
    grad = torch.randn(numel) * 1e-3
    lists = [[torch.randn(numel) * 0.02], [grad], [torch.zeros(numel)], [grad * grad], [1 / (grad.abs() + 1e-8)]]
    hyper = update_kwargs(DEFAULTS)  # the class defaults as anon_hf.functional.anon takes them
    scalars = step_scalars_from(hyper, averaged=False)
    rule = step_rule(hyper["gamma"], hyper["eps"], hyper["max_precond_ratio"], hyper["keep_unseen"])
    # inv_bias2 = 1 with s = g**2 and v = 1 / |g| keeps v**2 * sigma near 1: the limit (ratio 10) binds nowhere.
    step_size = [-hyper["lr"]]
    call = KernelCall([0], lists, [torch.tensor([17.0])], scalars, (step_size, [1.0]), (False, False), None, rule)
    return call.write


def adamw_call(numel: int) -> Callable[[], None]:
    """One step of torch's fused AdamW op at its defaults on ``numel`` elements."""
    torch.manual_seed(0)
    tensors = [[torch.randn(numel)] for _ in range(2)] + [[torch.zeros(numel)], [torch.rand(numel)], []]
    step = [torch.tensor(16.0)]
    defaults = torch.optim.AdamW([torch.zeros(1)]).defaults
    (beta1, beta2), keys = defaults["betas"], ("lr", "weight_decay", "eps", "amsgrad", "maximize")
    options = {key: defaults[key] for key in keys} | dict(beta1=beta1, beta2=beta2)
    return lambda: torch._fused_adamw_(*tensors, step, **options)


def ns_per_element(call: Callable[[], None], numel: int, calls: int) -> float:
    start = time.thread_time_ns()
    for _ in range(calls):
        call()
    return (time.thread_time_ns() - start) / calls / numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32768,16777216", help="elements per tensor, comma-separated")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if (reason := cpu_kernel.kernel_unavailable_reason()) is not None:
        raise SystemExit(f"the C++ kernel is unavailable: {reason}")
    print(f"ISA {cpu_kernel.capability()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for numel in (int(size) for size in args.sizes.split(",")):
        calls = max(3, (1 << 27) // numel)  # about 2**27 elements a round
        candidates = {"anon kernel": anon_call(numel), "torch._fused_adamw_": adamw_call(numel)}
        for call in candidates.values():
            call()
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.rounds):
            for name, call in candidates.items():
                times[name].append(ns_per_element(call, numel, calls))
        anon, adamw = (statistics.median(values) for values in times.values())
        print(
            f"{numel:>10} elements: anon {anon:.3f} ns/elem, fused AdamW {adamw:.3f} ns/elem, ratio {anon / adamw:.2f}x"
        )


if __name__ == "__main__":
    main()
