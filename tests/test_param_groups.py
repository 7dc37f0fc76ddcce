"""`create_anon_optimizer` / `decay_param_groups`: AdamW-style decay groups with torch alone."""

import pytest
import torch
from torch import nn

from anon_hf import Anon, create_anon_optimizer
from anon_hf.param_groups import decay_param_groups


class MyRMSNorm(nn.Module):  # model code's own norm class, known only by its name
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * self.weight


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.rms = MyRMSNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def names(model, group):
    lookup = {id(p): n for n, p in model.named_parameters()}
    return sorted(lookup[id(p)] for p in group["params"])


def test_groups_split_biases_and_norms_from_weights():
    model = Net()
    decay, no_decay = decay_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert names(model, decay) == ["embed.weight", "proj.weight"]
    assert names(model, no_decay) == ["bn.bias", "bn.weight", "ln.bias", "ln.weight", "proj.bias", "rms.weight"]


def test_custom_patterns_and_empty_groups():
    model = nn.Linear(3, 3, bias=False)
    assert [len(g["params"]) for g in decay_param_groups(model, 0.1)] == [1]  # no empty no-decay group
    groups = decay_param_groups(model, 0.1, no_decay_patterns=(r"^weight$",))
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.0, 1)]


def test_create_anon_optimizer_passes_anon_arguments_and_steps():
    model = Net()
    optimizer = create_anon_optimizer(model, lr=0.01, weight_decay=0.1, gamma=0.5, betas=(0.8, 0.9))
    assert type(optimizer) is Anon
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.01 and g["gamma"] == 0.5 and g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)
    before = model.proj.weight.detach().clone()
    model.proj(model.embed(torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.proj.weight)


def test_create_anon_optimizer_errors():
    with pytest.raises(TypeError, match="do not pass `params`"):
        create_anon_optimizer(Net(), lr=0.1, params=[])
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        create_anon_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=0.1)
    with pytest.raises(ValueError, match="Invalid gamma value"):
        create_anon_optimizer(Net(), lr=0.1, gamma=float("nan"))
