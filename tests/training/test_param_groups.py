"""The optimizer's parameter groups: weight decay by tensor kind and per-module learning-rate scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unigendet.config.loader import ConfigError
from unigendet.distributed.engine import OptimConfig, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(5, 4)
        self.trunk = nn.Linear(4, 4)
        self.detection_head = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
        self.head = nn.Linear(4, 1)  # its name is a suffix of "detection_head": must not be matched by it
        self.detection_head.add_module("inner", nn.Linear(2, 2))


class Wrapped(nn.Module):
    """Parameter names under extra prefixes, as a LoRA wrapper gives them."""

    def __init__(self):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = Toy()


def _lr_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g.get("lr") for g in groups for p in g["params"]}


def _decay_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def test_without_scales_the_groups_are_decayed_matrices_then_the_rest():
    model = Toy()
    groups = param_groups(model, 0.1)
    assert len(groups) == 2 and all("lr" not in g for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model.trunk.weight), id(model.detection_head[1].weight), id(model.head.weight),
                       id(model.detection_head.inner.weight)}


@pytest.mark.parametrize("wrapper", [Toy, Wrapped])
def test_scaled_modules_get_their_own_learning_rate_and_keep_their_weight_decay(wrapper):
    model = wrapper()
    toy = model if isinstance(model, Toy) else model.base_model.model
    groups = param_groups(model, 0.1, lr=1e-3, lr_scale={"detection_head": 0.1, "detection_head.inner": 3.0})
    lr, decay = _lr_of(groups), _decay_of(groups)
    params = [p for p in model.parameters()]
    assert sorted(lr) == sorted(id(p) for p in params), "every trainable parameter exactly once"
    assert sum(len(g["params"]) for g in groups) == len(params)
    for p in toy.detection_head[0].parameters():
        assert lr[id(p)] == pytest.approx(1e-4) and decay[id(p)] == 0.0
    head_weight = id(toy.detection_head[1].weight)
    assert lr[head_weight] == pytest.approx(1e-4) and decay[head_weight] == 0.1
    # The longest matching module path wins.
    assert lr[id(toy.detection_head.inner.weight)] == pytest.approx(3e-3)
    for p in (*toy.trunk.parameters(), *toy.head.parameters(), toy.embed_tokens.weight):
        assert lr[id(p)] == pytest.approx(1e-3)
    assert decay[id(toy.embed_tokens.weight)] == 0.0


def test_a_module_the_model_lacks_is_an_error_and_a_frozen_one_is_skipped():
    model = Toy()
    with pytest.raises(ConfigError, match="detection_hed"):
        param_groups(model, 0.0, lr=1e-3, lr_scale={"detection_hed": 0.1})
    with pytest.raises(ConfigError, match="etection_head"):  # a part of a name is not a module path
        param_groups(model, 0.0, lr=1e-3, lr_scale={"etection_head": 0.1})
    model.detection_head.requires_grad_(False)
    groups = param_groups(model, 0.0, lr=1e-3, lr_scale={"detection_head": 0.1})
    assert set(_lr_of(groups).values()) == {1e-3}
    assert not any(id(p) in _lr_of(groups) for p in model.detection_head.parameters())


def test_scales_are_refused_for_a_model_with_its_own_groups():
    class OwnGroups(Toy):
        def optimizer_param_groups(self, weight_decay):
            return [{"params": list(self.parameters()), "lr": 1e-4, "weight_decay": weight_decay}]

    assert param_groups(OwnGroups(), 0.0, lr=1e-3)[0]["lr"] == 1e-4
    with pytest.raises(ConfigError, match="its own per-module learning rates"):
        param_groups(OwnGroups(), 0.0, lr=1e-3, lr_scale={"detection_head": 0.1})


def test_scales_are_validated_in_the_config():
    OptimConfig(lr_scale={"detection_head": 0.5}).validate()
    for bad, match in (({"detection_head": 0.0}, "lr_scale.detection_head"), ({"": 1.0}, "module path"),
                       ({"detection_head.": 1.0}, "module path")):
        with pytest.raises(ConfigError, match=match):
            OptimConfig(lr_scale=bad).validate()


def test_adamw_and_its_schedule_apply_each_groups_rate():
    """One AdamW step on the groups, as the engine builds them: the first Adam step moves each weight by about its
    group's learning rate, whatever the gradient's size."""
    torch.manual_seed(0)
    model = Toy()
    groups = param_groups(model, 0.0, lr=1e-2, lr_scale={"detection_head": 0.1})
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = model.embed_tokens(torch.tensor([0, 1, 2, 3]))
    h = model.trunk(x)
    (model.detection_head(h).square().sum() + model.head(h).sum()).backward()
    optimizer.step()
    schedule.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["detection_head.1.weight"] == pytest.approx(0.5e-3, rel=1e-3)
    assert moved["trunk.weight"] == pytest.approx(0.5e-2, rel=1e-3)
