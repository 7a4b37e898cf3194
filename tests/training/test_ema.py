"""The EMA arithmetic and owner assignment, in one process."""

import torch

from unigendet.training.ema import ShardedEMA, assign_owners


def test_assign_owners_balances_sizes():
    owners = assign_owners([100, 60, 50, 10, 5], world=2)
    load = [sum(s for s, o in zip([100, 60, 50, 10, 5], owners) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= 15 and owners[0] != owners[1]


def test_ema_follows_the_recurrence():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    ema = ShardedEMA(model, decay=0.9, zero_stage=2)
    expected = model.weight.detach().clone()
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(step + 1.0)
        ema.update()
        expected = 0.9 * expected + 0.1 * model.weight.detach()
    out = ema.consolidated()
    assert set(out) == {"weight"}  # frozen parameters are not averaged
    torch.testing.assert_close(out["weight"], expected)


def test_ema_save_load_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = ShardedEMA(model, decay=0.5, zero_stage=2)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update()
    ema.save(tmp_path)
    other = ShardedEMA(model, decay=0.5, zero_stage=2)
    other.load(tmp_path)
    for k, v in ema.consolidated().items():
        torch.testing.assert_close(other.consolidated()[k], v)
