"""The held-out field test: loss rises, their standard errors, and the keep rule, by hand."""

import math

import pytest
import torch

from ctr.compress.field_significance import FieldGain, HeldOut, field_test
from ctr.loader import Batch, make_batch


class FirstFieldLogit(torch.nn.Module):
    """A model whose logit is field 0's looked-up value; field 1's row is read and ignored."""

    def lookup(self, sparse) -> torch.Tensor:  # [B, 2 fields, dim 1]: the id itself is the row
        return sparse.values().view(2, -1).T.to(torch.float32).unsqueeze(-1)

    def interact(self, emb: torch.Tensor, dense: torch.Tensor, sparse) -> tuple[torch.Tensor, torch.Tensor]:
        return emb[:, 0, 0], emb.new_zeros(())


def batches() -> list[Batch]:
    """Field 0 reads +2, -2, +2, -2 (mean 0); field 1 reads 5, 7, 5, 7; labels 1, 0, 0, 0; two batches of 2."""
    ids = torch.tensor([[2, -2, 2, -2], [5, 7, 5, 7]])
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return [make_batch(["f0", "f1"], ids[:, i:i + 2], torch.zeros(2, 0), labels[i:i + 2]) for i in (0, 2)]


def test_gain_is_the_mean_loss_rise_when_the_field_reads_its_mean() -> None:
    gains = HeldOut(FirstFieldLogit(), batches()).gains([[0], [1], [0, 1]])
    # with field 0 at its mean (0) every row costs ln 2; as read, three rows cost ln(1 + e^-2) and
    # the third (logit +2, label 0) ln(1 + e^2): the rises are 0.5662 x 3 and -1.4338
    small, large = math.log1p(math.exp(-2)), math.log1p(math.exp(2))
    assert gains[0].gain == pytest.approx(math.log(2) - (3 * small + large) / 4, abs=1e-6)
    # the rises sit at mean + 0.5, +0.5, -1.5, +0.5: variance 0.75 over 4 rows
    assert gains[0].stderr == pytest.approx(math.sqrt(0.75) / 2, abs=1e-6)
    assert gains[1] == FieldGain(0.0, 0.0) and gains[1].z == 0.0  # an ignored field changes nothing
    assert gains[2] == gains[0]  # both together: field 0's rise alone


def test_rows_caps_the_rows_read_inside_a_batch() -> None:
    gains = HeldOut(FirstFieldLogit(), batches(), rows=3).gains([[0]])  # rows 0-2: field 0's mean is 2/3
    first = [torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y)).item()
             for x, y in ((2.0, 1.0), (-2.0, 0.0), (2.0, 0.0))]
    at_mean = [torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(2 / 3), torch.tensor(y)).item()
               for y in (1.0, 0.0, 0.0)]
    assert gains[0].gain == pytest.approx(sum(at_mean) / 3 - sum(first) / 3, abs=1e-6)


class Scripted:
    """A held-out set whose rises are given: per field, and per removed set (in the order tried)."""

    mean = torch.zeros(4, 1)

    def __init__(self, single: list[FieldGain], together: dict[tuple[int, ...], FieldGain]) -> None:
        self.single, self.together, self.asked = single, together, []

    def gains(self, groups: list[list[int]]) -> list[FieldGain]:
        if len(groups) == len(self.single):
            return self.single
        self.asked.append(tuple(groups[0]))
        return [self.together[tuple(groups[0])]]


def test_removed_fields_come_back_strongest_first_until_together_they_are_insignificant() -> None:
    # one-sided 5%: z > 1.645 keeps a field; fields 1, 2, 3 fail alone, but together they matter
    single = [FieldGain(3.0, 1.0), FieldGain(1.0, 1.0), FieldGain(1.5, 1.0), FieldGain(-1.0, 1.0)]
    held_out = Scripted(single, {(3, 1, 2): FieldGain(2.0, 1.0), (3, 1): FieldGain(0.5, 1.0)})
    test = field_test(held_out, 4, 0.05)
    assert held_out.asked == [(3, 1, 2), (3, 1)]  # field 2 (z 1.5) comes back first
    assert test.kept == [True, False, True, False] and test.removed_gain == FieldGain(0.5, 1.0)
    assert test.gains == single


def test_a_field_stays_when_its_gain_is_significant_and_p_1_keeps_all() -> None:
    single = [FieldGain(1.7, 1.0), FieldGain(1.6, 1.0), FieldGain(-3.0, 1.0), FieldGain(0.0, 0.0)]
    held_out = Scripted(single, {(2, 3, 1): FieldGain(-1.0, 1.0)})
    assert field_test(held_out, 4, 0.05).kept == [True, False, False, False]
    assert field_test(held_out, 4, 1.0).kept == [True] * 4 and held_out.asked == [(2, 3, 1)]


def test_no_held_out_rows_keep_every_field() -> None:
    held_out = HeldOut(FirstFieldLogit(), [])
    assert held_out.mean is None
    assert field_test(held_out, 2, 0.05).kept == [True, True]


def test_a_test_that_is_off_reads_no_rows() -> None:
    class Unreadable:
        def __iter__(self):
            raise AssertionError("read")

    assert field_test(HeldOut(FirstFieldLogit(), Unreadable()), 2, 1.0).kept == [True, True]
