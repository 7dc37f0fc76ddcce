"""Which tensors hold Anon's largest preconditioners, and how large a step they take, around each refresh.

Runs ``recipes/causal_lm/train.py`` with its argv and, after the steps around each refresh (and a few others),
prints for the three tensors with the largest preconditioner ``v``: ``max v``, ``max |v * m_hat|`` (the largest
step of that tensor in units of lr: ``m_hat = |exp_avg| / (1 - beta1**t)``) and the share of elements whose ``v``
is still 0 (not seen by a refresh yet). This is how docs/sweep.md traces a stalled run to its embedding rows:

    python recipes/sweep/probe.py --optim anon --optim_args "gamma=1" --learning_rate 3.16e-3 --seed 0 \\
        --max_steps 300 --save_final_model false --report_to none --disable_tqdm true --log_level error
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import transformers  # noqa: E402

from recipes.causal_lm import train  # noqa: E402  (imports anon_hf first, which registers --optim anon)

_REFRESHES = {2**k for k in range(20)}
_EXTRA_STEPS = {3, 40, 140}


class StepProbe(transformers.TrainerCallback):
    """Prints the largest preconditioners and steps per tensor; reads the state, changes nothing."""

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if not ({step, step - 1} & _REFRESHES or step in _EXTRA_STEPS or step == args.max_steps - 1):
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        beta1 = inner.param_groups[0]["betas"][0]
        names = {p: n for n, p in model.named_parameters()}
        rows = []
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                if "precond" not in st:
                    continue
                v = st["precond"].float()
                m_hat = st["exp_avg"].float().abs() / (1 - beta1**step)
                rows.append((v.max().item(), (v * m_hat).max().item(), (v == 0).float().mean().item(), names[p]))
        rows.sort(reverse=True)
        top = "; ".join(f"{n}: max v {a:.2e}, max |v*m_hat| {b:.2e}, v==0 {z:.2f}" for a, b, z, n in rows[:3])
        print(f"step {step}: {top}", flush=True)


class _ProbedTrainer(transformers.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(StepProbe())


def main(argv: list[str] | None = None) -> dict:
    train.Trainer = _ProbedTrainer  # the recipe builds its Trainer by this name
    return train.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    print("eval_loss", main()["eval"].get("eval_loss"))
