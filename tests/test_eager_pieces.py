"""On CPU the eager paths step large tensors in cache-sized pieces between refreshes (``backends/eager.py``).

Every op of the step is elementwise, so the pieces must give exactly the bits of the same step over whole tensors.
The whole-tensor run is the same code with the piece size raised past every tensor (one piece each), and each run is
also held to the literal reference on its small tensors (``tests/test_optimizer.py`` covers the reference at large).
"""

from __future__ import annotations

import pytest
import torch

from anon_hf import Anon
from anon_hf.backends import eager
from anon_hf.refresh import unseen_flags

PIECE = 1 << 10  # small pieces, so that modest tensors are cut into many, with a remainder


def _params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    contiguous = torch.randn(5 * PIECE + 37, generator=generator)
    transposed = torch.randn(70, 50, generator=generator).t()  # non-contiguous: stepped whole
    matrix = torch.randn(3 * PIECE // 64 + 1, 64, generator=generator)
    small = torch.randn(9, generator=generator)
    complex_row = torch.randn(2 * PIECE + 3, dtype=torch.complex64, generator=generator)
    return [torch.nn.Parameter(t.clone()) for t in (contiguous, transposed, matrix, small, complex_row)]


def _run(monkeypatch, piece_numel: int, param_dtype: torch.dtype, steps: int = 40, **kwargs) -> list[torch.Tensor]:
    monkeypatch.setattr(eager, "_PIECE_NUMEL", piece_numel)
    params = _params()
    if param_dtype != torch.float32 or "precond_dtype" in kwargs:  # both take real params only
        params = [torch.nn.Parameter(p.detach().to(param_dtype)) for p in params if not p.is_complex()]
    optimizer = Anon(params, lr=1e-2, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        for index, p in enumerate(params):
            grad = torch.randn(p.shape, dtype=p.dtype, generator=generator) * 1e-2
            if step < 12:
                grad.view(-1)[: PIECE // 2] = 0  # late-seen elements: v stays 0 past the first refreshes
            # One tensor skips some steps, so that tensors' step counters (and bias corrections) differ.
            p.grad = None if (index == 3 and step % 5 == 0) else grad.to(p.dtype)
        optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return [p.detach().clone() for p in params] + [t.clone() for t in state]


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(max_precond_ratio=1.0, weight_decay=0.1),
        dict(weight_decay=0.1, decoupled_weight_decay=False, maximize=True, bounds=(-1.0, 1.0)),
        dict(gamma=0.5, precond_dtype="bf16", moments_dtype="bf16"),
        dict(keep_unseen=False, max_precond_ratio=None),
        dict(gamma=0.0),
    ],
    ids=["defaults", "ratio1", "l2-maximize-bounds", "bf16-state", "published", "gamma0"],
)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pieces_give_the_bits_of_whole_tensors(monkeypatch, foreach, kwargs, param_dtype):
    pieces = _run(monkeypatch, PIECE, param_dtype, foreach=foreach, **kwargs)
    whole = _run(monkeypatch, 1 << 40, param_dtype, foreach=foreach, **kwargs)
    assert len(pieces) == len(whole)
    for cut, uncut in zip(pieces, whole, strict=True):
        assert torch.equal(cut, uncut)
    moved = pieces[0][: PIECE // 2]
    assert torch.isfinite(moved).all()


def test_a_large_tensor_is_cut_into_pieces_with_a_remainder_each_with_its_own_unseen_flag(monkeypatch):
    monkeypatch.setattr(eager, "_PIECE_NUMEL", PIECE)
    precond = torch.ones(5 * PIECE + 37)
    precond[PIECE + 3] = 0.0
    precond[-1] = 0.0
    flags = unseen_flags([precond], PIECE)[0]
    assert flags == (False, True, False, False, False, True)
    row = (torch.zeros(5 * PIECE + 37), None, None, None, precond, 7, flags, 1.0)
    pieces = list(eager._cut(row))
    assert [p[0].numel() for p in pieces] == [PIECE] * 5 + [37]
    assert all(p[0].data_ptr() == row[0].data_ptr() + k * PIECE * 4 for k, p in enumerate(pieces))
    assert [p[6] for p in pieces] == list(flags)
    assert all(p[5] == 7 and p[7] == 1.0 for p in pieces)
    transposed = torch.zeros(70, 50).t()
    whole = list(eager._cut((transposed, None, None, None, transposed, 7, (False, True, False, False), 1.0)))
    assert len(whole) == 1 and whole[0][6] is True
