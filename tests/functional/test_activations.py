"""``activation_codes``: every piecewise-linear unit, module or functional, counted once, stored compactly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensitivity.functional import activation_codes


class Hidden(nn.Module):
    """``Linear(4, 6)`` followed by one way of writing a ReLU."""

    def __init__(self, relu):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.relu = relu

    def forward(self, x):
        return self.relu(self.fc(x))


RELUS = {
    "nn.ReLU": nn.ReLU(),
    "nn.ReLU(inplace)": nn.ReLU(inplace=True),
    "F.relu": F.relu,
    "F.relu(inplace)": lambda h: F.relu(h, inplace=True),
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "Tensor.relu": lambda h: h.relu(),
    "clamp(min=0)": lambda h: h.clamp(min=0),
    "clamp_min(0)": lambda h: h.clamp_min(0),
}


@pytest.mark.parametrize("name", list(RELUS))
def test_every_way_of_writing_relu_gives_the_same_codes_counted_once(name):
    x = torch.randn(16, 4)
    reference = Hidden(nn.ReLU())
    model = Hidden(RELUS[name])
    model.load_state_dict(reference.state_dict())
    codes = activation_codes(model, x)
    expected = (reference.fc(x) > 0).to(torch.uint8)
    assert codes.sides.dtype == torch.bool and codes.pieces.dtype == torch.uint8
    assert codes.pieces.shape == (16, 6)  # one unit per neuron: not once per F.relu and once per torch.relu
    assert torch.equal(codes.pieces, expected)
    assert len(codes.units) == 1


def test_the_output_of_the_model_is_unchanged_including_in_place_units():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            h = self.fc(x)
            F.relu(h, inplace=True)
            h.clamp_(max=0.5)
            return h  # relies on the in-place calls

    model, x = InPlace(), torch.randn(8, 4)
    with torch.no_grad():
        expected = model(x)
    activation_codes(model, x)
    codes = activation_codes(model, x)
    assert codes.units == ("relu", "clamp_")
    with torch.no_grad():
        assert torch.equal(model(x), expected)


PIECES = [  # (module, functional form, thresholds)
    (nn.LeakyReLU(0.1), lambda u: F.leaky_relu(u, 0.1), (0.0,)),
    (nn.ReLU6(), F.relu6, (0.0, 6.0)),
    (nn.Hardtanh(-2.0, 3.0), lambda u: F.hardtanh(u, -2.0, 3.0), (-2.0, 3.0)),
    (nn.Hardsigmoid(), F.hardsigmoid, (-3.0, 3.0)),
    (None, lambda u: u.clamp(-1.0, 2.0), (-1.0, 2.0)),
    (None, lambda u: torch.clamp(u, max=1.5), (1.5,)),
]


@pytest.mark.parametrize("module, functional, thresholds", PIECES)
def test_piece_indices_of_module_and_functional_units(module, functional, thresholds):
    u = torch.linspace(-8, 8, 161).reshape(7, 23)
    expected = sum((u > t).to(torch.uint8) for t in thresholds)
    for unit in (module, functional):
        if unit is not None:
            assert torch.equal(activation_codes(unit, u).pieces, expected)


def test_prelu_module_and_functional():
    prelu = nn.PReLU(3, init=0.2)
    x = torch.randn(5, 3, 4)
    expected = (x > 0).to(torch.uint8).flatten(1)
    assert torch.equal(activation_codes(prelu, x).pieces, expected)
    assert torch.equal(activation_codes(lambda v: F.prelu(v, prelu.weight), x).pieces, expected)


def test_a_jump_over_the_middle_piece_counts_two():
    codes = activation_codes(nn.ReLU6(), torch.tensor([[-1.0], [3.0], [7.0]]))
    assert codes.pieces.flatten().tolist() == [0, 1, 2]
    assert codes[0:1].distance(codes[2:3]).tolist() == [2]
    assert codes[0:1].distance(codes[1:2]).tolist() == [1]


def _winners_2d(x, kernel, stride, padding, dilation):
    """Index (in the pooled plane) of the winner of each window, by brute force over unfolded windows."""
    b, c, h, w = x.shape
    padded = F.pad(x, [padding] * 4, value=-float("inf"))
    windows = F.unfold(padded, kernel, dilation=dilation, stride=stride).view(b, c, kernel * kernel, -1)
    plane = F.pad(torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w), [padding] * 4, value=-1.0)
    plane_windows = F.unfold(plane, kernel, dilation=dilation, stride=stride)[0]  # [K, L]
    return plane_windows.gather(0, windows.argmax(dim=2).flatten(0, 1)).view(b, c, -1).flatten(1).long()


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation", [(2, 2, 0, 1), (3, 1, 1, 1), (2, 1, 0, 2), (3, 2, 1, 1)]
)
def test_max_pool_winners(kernel, stride, padding, dilation):
    x = torch.randn(3, 2, 7, 7)
    pool = nn.MaxPool2d(kernel, stride, padding, dilation)
    codes = activation_codes(pool, x)
    assert codes.sides.shape == (3, 0)
    assert codes.winners.dtype == torch.uint8  # a 7 x 7 plane: indices fit in a byte
    assert torch.equal(codes.winners.long(), _winners_2d(x, kernel, stride, padding, dilation))
    functional = activation_codes(lambda v: F.max_pool2d(v, kernel, stride, padding, dilation), x)
    assert torch.equal(functional.winners, codes.winners)


@pytest.mark.parametrize("channels", [2, 8])
def test_max_pool_winners_with_ties_in_either_layout(channels, monkeypatch):
    """From 4 channels on the CPU the winners are computed in the channels-last layout (faster there): the same
    winners as the brute force, the first maximum of a window where several tie (ReLU's zeros, rounded values), and
    the model gets its own values back, in its own layout."""
    from lightning_sensitivity.functional import units

    layouts: list[bool] = []
    pool = units._POOL_WITH_INDICES[2]

    def recorded(u, *args, **kwargs):
        layouts.append(u.is_contiguous(memory_format=torch.channels_last) and not u.is_contiguous())
        return pool(u, *args, **kwargs)

    monkeypatch.setitem(units._POOL_WITH_INDICES, 2, recorded)
    torch.manual_seed(0)
    x = torch.randn(3, channels, 9, 9).relu()
    x = torch.where(torch.rand_like(x) < 0.5, x.round(), x)  # many windows with a tie at their maximum
    for kernel, stride, padding, dilation in [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 0, 2)]:
        model = nn.Sequential(nn.MaxPool2d(kernel, stride, padding, dilation), nn.Flatten())
        seen: list[torch.Tensor] = []
        model[1].register_forward_hook(lambda module, args, out, into=seen: into.append(args[0]))
        codes = activation_codes(model, x)
        assert torch.equal(codes.winners.long(), _winners_2d(x, kernel, stride, padding, dilation))
        assert torch.equal(seen[0], model[0](x)) and seen[0].is_contiguous()
    assert layouts == [channels >= 4] * 3


def test_max_pool_1d_3d_and_return_indices():
    x1, x3 = torch.randn(2, 3, 10), torch.randn(2, 1, 4, 4, 4)
    codes1 = activation_codes(nn.MaxPool1d(3, 2), x1)
    assert torch.equal(
        codes1.winners.long(), (x1.unfold(2, 3, 2).argmax(-1) + 2 * torch.arange(4)).flatten(1)
    )
    codes3 = activation_codes(nn.MaxPool3d(2), x3)
    plane = torch.arange(64.0).view(1, 1, 4, 4, 4)
    unfold = lambda v: v.unfold(2, 2, 2).unfold(3, 2, 2).unfold(4, 2, 2).flatten(-3)  # noqa: E731
    expected = unfold(plane).expand(2, -1, -1, -1, -1, -1).gather(-1, unfold(x3).argmax(-1, keepdim=True))
    assert torch.equal(codes3.winners.long(), expected.flatten(1).long())

    def with_indices(v):
        out, indices = F.max_pool1d(v, 2, return_indices=True)
        return out + indices  # the tuple is returned as the model expects

    assert activation_codes(with_indices, x1).winners.shape == (2, 15)


def test_winners_of_large_planes_use_wider_integers():
    codes = activation_codes(nn.MaxPool2d(2), torch.randn(1, 1, 40, 40))
    assert codes.winners.dtype == torch.int16
    assert int(codes.winners.max()) < 1600


def test_a_winner_change_counts_one():
    codes = activation_codes(nn.MaxPool1d(4), torch.tensor([[[0.0, 1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0, 0.0]]]))
    assert codes.winners.flatten().tolist() == [3, 0]
    assert codes[0:1].distance(codes[1:2]).tolist() == [1]


def test_conv_net_with_batch_norm_in_train_mode_is_measured_in_eval_mode_and_restored():
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 2),
    )
    model.train()
    model[1].running_mean.fill_(0.3)
    x = torch.randn(6, 1, 8, 8)
    rng = torch.get_rng_state()
    codes = activation_codes(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    alone = activation_codes(model, x[:1])  # eval mode: a point's code does not depend on its batch
    assert torch.equal(alone.pieces, codes.pieces[:1])
    assert torch.equal(alone.winners, codes.winners[:1])
    assert codes.units == ("relu", "max_pool2d")
    assert codes.num_units == 3 * 6 * 6 + 3 * 3 * 3


def test_clamps_on_tensors_outside_the_batch_are_not_units():
    class Clipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return F.linear(x, self.fc.weight.clamp(-1, 1)).relu()

    assert activation_codes(Clipped(), torch.randn(4, 3)).pieces.shape == (4, 5)


def test_model_without_piecewise_linear_units_names_its_non_linearities():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2), nn.Sigmoid()
    )
    with pytest.raises(ValueError, match="no piecewise-linear unit") as error:
        activation_codes(model, torch.randn(2, 3))
    for name in ("tanh", "gelu", "sigmoid"):
        assert name in str(error.value)


def test_codes_inside_an_autocast_region_are_the_full_precision_codes():
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    x = torch.randn(256, 4) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = activation_codes(model, x)
    assert torch.equal(inside.sides, activation_codes(model, x).sides)


def test_piecewise_linear_operations_that_are_not_recorded_are_named_in_a_warning():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten())
    with pytest.warns(UserWarning, match="adaptive_max_pool2d"):
        codes = activation_codes(model, torch.randn(3, 1, 6, 6))
    assert codes.units == ("relu",)


@pytest.mark.parametrize("units", [7, 2040, 2048, 3000, 255 * 8 * 3 + 5])
def test_distance_of_wide_codes_equals_a_unit_by_unit_count(units):
    # Byte lanes of a sum of 64-bit words carry after 255 words (2,040 units): wider codes are summed in groups.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, units), nn.ReLU())
    codes = activation_codes(model, torch.randn(9, 2))
    expected = (codes.pieces[1:].long() - codes.pieces[:-1].long()).abs().sum(1)
    assert torch.equal(codes[1:].distance(codes[:-1]).long(), expected)
    if units > 255:
        assert int(expected.max()) > 255  # some rows differ in more units than one byte lane holds


def test_modules_held_by_a_partial_or_a_closure_are_measured_in_eval_mode_and_restored():
    import functools

    model = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.ReLU()).train()
    x = torch.randn(8, 4)
    with torch.no_grad():
        expected = (model.eval()(x) > 0).to(torch.uint8)
    model.train()
    for form in (functools.partial(lambda m, v: m(v), model), lambda v: model(v), model.forward):
        assert torch.equal(activation_codes(form, x).pieces, expected)  # dropout off
        assert model.training and model[1].training
