"""Where the eager paths' max_precond_ratio limit spends its time: one step between refreshes of ``Anon`` (for-loop
or foreach) on the (c) shapes of ``step_time.py`` (22.9M parameters), at the defaults, without the limit
(``max_precond_ratio=None``), and at the defaults with the limit's per-piece "cannot bind" test answered for free
(``refresh._limit_cannot_bind`` replaced by "cannot bind" everywhere, which is true here: every gradient is the same
each step, so v**2 * sigma stays near 1 against the ratio's 100), and with a stand-in test of one pass (one product of
``v`` and ``s``, one batched reduction, one read-back; its verdict discarded): the least a test carried from step to
step would cost. The third row is what the limit would cost if its test cost nothing.

Thread CPU time, rounds alternating between the three optimizers, median per optimizer, ratio to the median without
the limit.

    OMP_NUM_THREADS=1 python benchmarks/eager_limit_cost.py --path foreach
    OMP_NUM_THREADS=1 python benchmarks/eager_limit_cost.py --path forloop
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import llama_shapes_20m  # noqa: E402

import anon_hf.refresh as refresh  # noqa: E402
from anon_hf import Anon  # noqa: E402


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in llama_shapes_20m()]
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    return params


def _free_test(exp_avg_sqs, preconds, inv_bias2s, *, eps, scale):
    return [True] * len(preconds)


def _one_pass_test(exp_avg_sqs, preconds, inv_bias2s, *, eps, scale):
    products = torch._foreach_mul(preconds, exp_avg_sqs)
    torch.stack(torch._foreach_max(products)).tolist()
    return [True] * len(preconds)


TESTS = {"defaults, free test": _free_test, "defaults, one-pass test": _one_pass_test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("foreach", "forloop"), default="foreach")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    foreach = args.path == "foreach"
    settings = {"no limit": dict(max_precond_ratio=None), "defaults": {}} | {name: {} for name in TESTS}
    optimizers = {name: Anon(_params(), lr=1e-3, foreach=foreach, **kw) for name, kw in settings.items()}
    for optimizer in optimizers.values():
        for _ in range(3):  # refreshes at steps 1 and 2, then an ordinary step
            optimizer.step()
    real_test = refresh._limit_cannot_bind
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            refresh._limit_cannot_bind = TESTS.get(name, real_test)
            for state in optimizer.state.values():
                state["step"].fill_(16)  # step 17: an ordinary step, not a refresh
            start = time.thread_time()
            optimizer.step()
            times[name].append(time.thread_time() - start)
    refresh._limit_cannot_bind = real_test
    base = statistics.median(times["no limit"])
    print(
        f"{args.path}, 22.9M params, ISA {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:24s} {1e3 * median:7.1f} ms  {median / base:.2f}x of no limit")


if __name__ == "__main__":
    main()
