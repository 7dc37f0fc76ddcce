"""Which tensors hold Anon's largest preconditioners, and how large a step they take, around each refresh.

Runs ``recipes/causal_lm/train.py`` with its argv and, after the steps around each refresh (and a few others),
prints for the three tensors with the largest preconditioner ``v``: ``max v``, ``max |v * m_hat|`` (the largest
step of that tensor in units of lr: ``m_hat = |exp_avg| / (1 - beta1**t)``, ``v`` as that step used it, under
``max_precond_ratio``'s limit), the share of elements whose ``v`` is still 0 (not seen by a refresh yet) and the
share the limit bound at that step. This is how docs/sweep.md traces a stalled run to its embedding rows:

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

from anon_hf.refresh import inverse_bias_correction, step_preconditioners, step_rule, unseen_flags  # noqa: E402
from anon_hf.schedule import gradients_since_refresh, is_refresh_step  # noqa: E402
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
                used = _used_preconditioner(st, v, group, step)
                m_hat = st["exp_avg"].float().abs() / (1 - beta1**step)
                limited = (used < v).float().mean().item()
                rows.append(
                    (v.max().item(), (used * m_hat).max().item(), (v == 0).float().mean().item(), limited, names[p])
                )
        rows.sort(reverse=True)
        top = "; ".join(
            f"{n}: max v {a:.2e}, max |v*m_hat| {b:.2e}, v==0 {z:.2f}, limited {q:.4f}" for a, b, z, q, n in rows[:3]
        )
        print(f"step {step}: {top}", flush=True)


def _used_preconditioner(state: dict, v, group: dict, step: int):
    """The preconditioner step ``step`` multiplied ``m_hat`` by: ``v`` at a refresh, else what the group's
    ``anon_hf.refresh.StepRule`` makes of it (``max_precond_ratio``'s limit, the late-seen estimate where v == 0)."""
    refresh, ratio = group["refresh"], group.get("max_precond_ratio")
    rule = step_rule(group["gamma"], group["eps"], ratio, group.get("keep_unseen", True))
    if is_refresh_step(step, refresh):
        return v
    inv_bias2 = inverse_bias_correction(group["betas"][1], gradients_since_refresh(step, refresh))
    used = step_preconditioners(
        [state["exp_avg_sq"].float()],
        [v],
        [inv_bias2],
        unseen_flags([v]),
        rule=rule,
        gamma=group["gamma"],
        eps=group["eps"],
        max_ratio=ratio,
    )
    return used[0]


class _ProbedTrainer(transformers.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(StepProbe())


def main(argv: list[str] | None = None) -> dict:
    train.Trainer = _ProbedTrainer  # the recipe builds its Trainer by this name
    return train.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    print("eval_loss", main()["eval"].get("eval_loss"))
