"""Docstring fragments shared by the optimizer class, the functional API and the integrations."""

__all__ = [
    "gamma_doc",
    "refresh_doc",
    "eps_doc",
    "weight_decay_doc",
    "foreach_doc",
    "fused_doc",
    "precond_dtype_doc",
    "moments_dtype_doc",
    "maximize_doc",
    "keep_unseen_doc",
    "max_precond_ratio_doc",
]

gamma_doc = r"""gamma (float, optional): power applied to the second-moment estimate before it becomes the
            preconditioner, so that :math:`v = (\bar u)^{-1/2}` with :math:`\bar u` a running mean of
            :math:`\hat\sigma^{\gamma}`. ``0`` gives SGD with EMA momentum (no second moment is stored),
            ``1`` an Adam-like method; any finite real is allowed, and values below 0 or above 1 extrapolate
            beyond SGD and Adam on purpose. The paper's reference code defaults to ``0``; anon-hf defaults
            to ``1`` so that switching from AdamW at the same learning rate works (default: 1.0)"""

refresh_doc = r"""refresh (str or int, optional): when the preconditioner is rebuilt. ``"pow2"`` refreshes at
            steps 1, 2, 4, 8, ... (the paper's schedule, O(log T) refreshes); ``"every"`` at each step; an
            integer N at step 1 and every multiple of N. Between refreshes the preconditioner is reused and
            the step needs no sqrt and no division (default: "pow2")"""

eps_doc = r"""eps (float, optional): term added to the bias-corrected second moment *inside* the power,
            AdaBelief-style, so it is not Adam's ``eps`` (which is added to :math:`\sqrt{v}`); must be > 0
            (default: 1e-16)"""

weight_decay_doc = r"""weight_decay (float, optional): weight decay coefficient, >= 0. With
            ``decoupled_weight_decay=True`` it is applied as AdamW does, :math:`\theta \leftarrow
            \theta(1 - \eta\lambda)`; with ``False`` it is added to the gradient (L2), as in the paper's
            reference code (default: 0)"""

foreach_doc = r"""foreach (bool, optional): whether the foreach implementation (``torch._foreach_*`` kernels over
            tensors grouped by device and dtype) is used. ``None`` follows torch.optim's rule: foreach when
            every tensor is on a device with foreach kernels (CUDA), the for-loop otherwise. Both give the
            same results (default: None)"""

maximize_doc = r"""maximize (bool, optional): maximize the objective with respect to the params, instead of
            minimizing (default: False)"""

fused_doc = r"""fused (bool, optional): whether each tensor is updated in one pass that reads p, g, m, s, v and
            writes p, m, s once, refreshes included (a refresh checks for nan/inf first, so
            ``on_nonfinite="raise"`` raises before anything is written). On CPU this is anon_hf's C++ kernel
            (fp32/bf16/fp16 storage), built with torch's extension loader on first use, once per machine and torch
            version, then loaded from ``TORCH_EXTENSIONS_DIR`` (``anon-hf build-kernels`` builds it ahead of time;
            it needs a C++ compiler and ninja; if the build fails, CPU tensors take the foreach path, with one
            warning); elsewhere, and on CPU when ``ANON_HF_CPU_KERNEL=0`` is set, ``torch.compile``'d graphs,
            compiled once per process (Triton on CUDA). ``docs/performance.md`` gives the build and compile times.
            DTensor (FSDP2) params step on their local shards the same way; complex and non-contiguous params (and
            shards) take the foreach path; one log line says which path runs. Params on other devices (e.g.
            ``meta``) are refused before any state is created. State stays one tensor per parameter, so state dicts
            are unchanged. ``None`` follows ``foreach`` and never builds or compiles anything. Cannot be ``True``
            together with ``foreach`` (default: None)"""

precond_dtype_doc = r"""precond_dtype (torch.dtype or str, optional): storage dtype of the preconditioner ``precond``.
            ``None`` keeps the param's dtype; ``torch.bfloat16`` (or ``"bf16"``) halves its memory, rounding
            :math:`v` to 8 significant bits at each refresh (each coordinate's step size is then off by at most
            2**-9 relative). The update always computes in the param dtype, at least fp32. float16 is refused:
            :math:`v` can leave its range (default: None)"""

moments_dtype_doc = r"""moments_dtype (torch.dtype or str, optional): storage dtype of ``exp_avg`` and ``exp_avg_sq``;
            ``None`` keeps the param's dtype, ``torch.bfloat16`` halves their memory. In bf16 an increment
            ``(1 - beta2) * g**2`` smaller than 2**-9 of the accumulator rounds away, so with ``beta2=0.999``
            the accumulator under-counts new gradients once a refresh interval passes ~256 steps; see
            ``docs/performance.md`` for the measured effect on the loss (default: None)"""

keep_unseen_doc = r"""keep_unseen (bool, optional): at a refresh, an element with no gradient since the previous refresh
            (its accumulator is exactly 0) keeps its preconditioner, and an element whose preconditioner is
            still 0 (new state: no refresh has seen its gradient yet) starts its mean from this refresh's
            estimate. Between refreshes such an element steps from its first gradient with
            :math:`\sigma_t^{-\gamma/2}` over the gradients since the last refresh (Adam-like, for every gamma), so
            a weight first seen late (a new token's row, an expert first routed to) moves at once, by about
            ``(1 - beta1) / sqrt(1 - beta2)`` x lr at most, whatever the gradient's scale; ``v`` itself still
            changes only at refreshes. Where every element has a gradient at every refresh this is exactly the
            paper's update. ``False``
            reproduces the published code in every case: an element with no gradient gets
            :math:`\sigma = \epsilon`, so its preconditioner grows towards :math:`\epsilon^{-\gamma/2}` (1e8 at
            the defaults) and its first gradient after that takes a step that many times too large
            (default: True)"""

max_precond_ratio_doc = r"""max_precond_ratio (float or None, optional): between refreshes, an element's step uses
            :math:`\min(v, r \, \sigma_t^{-\gamma/2})`, with :math:`\sigma_t` the same estimate a refresh takes
            (:math:`s_t / (1 - \beta_2^{n}) + \epsilon`) over the :math:`n` gradients since the last refresh and
            :math:`r` this ratio, >= 1. :math:`v` averages earlier intervals, so an element whose gradients were
            tiny then and are large now (embedding and output rows of rare tokens) would otherwise step by
            thousands of lr until the next refresh; Adam's per-step second moment bounds such a step, and this is
            the same bound, effective only where :math:`v` exceeds it ``r``-fold. Costs a multiply and a compare per
            element per step in the fused kernel (a square root where it binds). Applies for gamma > 0 only:
            below, :math:`v` does not grow as gradients shrink. ``None`` turns it off: with
            ``keep_unseen=False`` that is the published algorithm exactly (default: 10.0)"""
