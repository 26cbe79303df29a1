"""Electrodes: canonical layouts, exact edits, clean removal, call-indexed sites.

Ground truth is computed by hand from the toy models' own layers (plain torch), and
for a real architecture from a tiny BERT / XLNet saved and reloaded by
:func:`neuroprobe.testing.make_tiny`.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroprobe.electrodes import Electrodes, from_canonical, to_canonical
from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.base import Site
from neuroprobe.subjects.registry import load_subject
from neuroprobe.testing import SUBJECT_FOR_ARCH


# ------------------------------------------------------------------ toy models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.down = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Twice(nn.Module):
    """Applies the same block twice (like XLNet's two streams or a shared cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.block(x)))


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


class TimeMajor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, B, U]
        return self.proj(x).sum(0)


def _seeded(cls):
    torch.manual_seed(0)
    return cls().eval()


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
             or m._forward_pre_hooks_with_kwargs or m._forward_hooks_always_called)
        for m in model.modules()
    )


# ------------------------------------------------------------ canonical layouts


@pytest.mark.parametrize("layout,shape", [("BTU", (2, 5, 3)), ("TBU", (5, 2, 3)), ("BU", (2, 3)), ("BCHW", (2, 3, 4, 5))])
def test_canonical_layouts_round_trip(layout: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    y = to_canonical(x, layout)
    assert y.dim() == 3
    assert torch.equal(from_canonical(y, layout, x), x)
    if layout == "BTU":
        assert torch.equal(y, x)
    elif layout == "TBU":
        assert y.shape == (2, 5, 3) and all(torch.equal(y[b, t], x[t, b]) for b in range(2) for t in range(5))
    elif layout == "BU":
        assert y.shape == (2, 1, 3) and torch.equal(y[:, 0], x)
    else:  # tokens are positions h*W + w, units are channels
        b, c, h, w = shape
        assert y.shape == (b, h * w, c)
        for i in range(h):
            for j in range(w):
                assert torch.equal(y[:, i * w + j, :], x[:, :, i, j])


def test_canonical_edit_round_trips_into_native_layouts() -> None:
    model = _seeded(Conv)
    x = torch.randn(2, 3, 4, 5)
    site = Site("conv", "conv", "output", "conv", layout="BCHW")

    def zero_channel(v: torch.Tensor, s: Site) -> torch.Tensor:
        v = v.clone()
        v[..., 2] = 0
        return v

    with torch.no_grad(), Electrodes(model, [site], edits={"conv": zero_channel}) as el:
        out = model(x)
    with torch.no_grad():
        maps = model.conv(x)
        maps[:, 2] = 0
        expected = model.head(maps.mean((2, 3)))
    assert torch.equal(out, expected)
    assert torch.equal(el.data["conv"], to_canonical(maps, "BCHW"))

    tm = _seeded(TimeMajor)
    xt = torch.randn(5, 2, 3)
    tsite = Site("proj", "proj", "output", "resid", layout="TBU")

    def zero_token(v: torch.Tensor, s: Site) -> torch.Tensor:  # canonical [B, T, U]: token 1 of stimulus 0
        v = v.clone()
        v[0, 1] = 0
        return v

    with torch.no_grad(), Electrodes(tm, [tsite], edits={"proj": zero_token}) as el:
        out = tm(xt)
    with torch.no_grad():
        native = tm.proj(xt)
        native[1, 0] = 0  # time-major: [T, B, U]
    assert torch.equal(out, native.sum(0))
    assert torch.equal(el.data["proj"], native.transpose(0, 1))


# ------------------------------------------------------------------- edits


def test_zeroing_units_is_exact_and_changes_downstream() -> None:
    model = _seeded(MLP)
    x = torch.randn(7, 4)
    site = Site("hidden", "down", "input", "mlp", layout="BU")
    units = [1, 4]

    def silence(v: torch.Tensor, s: Site) -> torch.Tensor:
        v = v.clone()
        v[..., units] = 0
        return v

    with torch.no_grad():
        before = model(x)
        with Electrodes(model, [site], edits={"hidden": silence}) as el:
            lesioned = model(x)
        h = model.act(model.up(x))
        h[:, units] = 0
        expected = model.down(h)
    assert torch.equal(lesioned, expected)
    assert not torch.equal(lesioned, before)
    assert torch.equal(el.data["hidden"][:, 0], h)  # what is read is the edited value


def test_edits_compose_in_order() -> None:
    model = _seeded(MLP)
    x = torch.randn(3, 4)
    site = Site("hidden", "down", "input", "mlp", layout="BU")
    double = lambda v, s: v * 2  # noqa: E731
    plus_one = lambda v, s: v + 1  # noqa: E731
    with torch.no_grad():
        h = model.act(model.up(x))
        with Electrodes(model, [site], edits={"hidden": [double, plus_one]}) as el:
            a = model(x)
        assert torch.equal(el.data["hidden"][:, 0], h * 2 + 1)
        assert torch.equal(a, model.down(h * 2 + 1))
        with Electrodes(model, [site], edits={"hidden": [plus_one, double]}) as el:
            b = model(x)
        assert torch.equal(el.data["hidden"][:, 0], (h + 1) * 2)
        assert torch.equal(b, model.down((h + 1) * 2))


def test_edit_that_changes_shape_raises_and_hooks_are_removed() -> None:
    model = _seeded(MLP)
    site = Site("hidden", "down", "input", "mlp", layout="BU")
    with pytest.raises(RuntimeError, match="changed the shape"):
        with torch.no_grad(), Electrodes(model, [site], edits={"hidden": lambda v, s: v[..., :2]}):
            model(torch.randn(2, 4))
    assert _no_hooks(model)


def test_unknown_module_and_unknown_edit_site_raise() -> None:
    model = _seeded(MLP)
    with pytest.raises(NeuroprobeError, match="does not exist"):
        with Electrodes(model, [Site("x", "nowhere.dense")]):
            pass
    assert _no_hooks(model)
    with pytest.raises(NeuroprobeError, match="not among the implanted"):
        Electrodes(model, [Site("hidden", "down", "input")], edits={"other": lambda v, s: v})


# -------------------------------------------------------------- hook hygiene


def test_hooks_are_gone_and_model_is_bit_identical_after_the_context() -> None:
    model = _seeded(MLP)
    x = torch.randn(5, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sites = [Site("up", "up", "output", "resid", layout="BU"), Site("hidden", "down", "input", "mlp", layout="BU")]
    with torch.no_grad():
        before = model(x)
        with Electrodes(model, sites, edits={"hidden": lambda v, s: v * 0}):
            assert not _no_hooks(model)
            model(x)
        after = model(x)
    assert _no_hooks(model)
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # also when the block raises
    with pytest.raises(ValueError):
        with Electrodes(model, sites):
            raise ValueError("boom")
    assert _no_hooks(model)


def test_real_model_untouched_after_lesion(tiny_dir) -> None:
    subject = load_subject(SUBJECT_FOR_ARCH["bert"], weights=tiny_dir("bert"), device="cpu", quiet=True)
    ids = subject.tokenizer(["my grandmother saw a dog", "a red cat"], padding=True, return_tensors="pt")
    sites = subject.sites("all")
    zero = lambda v, s: torch.zeros_like(v)  # noqa: E731
    with torch.inference_mode():
        before = subject.model(**ids).last_hidden_state
        with Electrodes(subject.model, sites, edits={"encoder.layer.0.mlp": zero}) as el:
            lesioned = subject.model(**ids).last_hidden_state
        after = subject.model(**ids).last_hidden_state
    assert _no_hooks(subject.model)
    assert torch.equal(before, after)
    assert not torch.equal(before, lesioned)
    assert torch.count_nonzero(el.data["encoder.layer.0.mlp"]) == 0
    # zeroing layer 0's MLP units changes the residual stream after it, not the attention before it
    with torch.inference_mode(), Electrodes(subject.model, sites) as clean:
        subject.model(**ids)
    assert torch.equal(clean.data["encoder.layer.0.attn"], el.data["encoder.layer.0.attn"])
    assert not torch.equal(clean.data["encoder.layer.0"], el.data["encoder.layer.0"])
    assert not torch.equal(clean.data["encoder.layer.1.mlp"], el.data["encoder.layer.1.mlp"])


# ----------------------------------------------------------- call-indexed sites


def test_call_indexed_sites_read_and_edit_only_their_call() -> None:
    model = _seeded(Twice)
    x = torch.randn(3, 5)
    sites = [Site("block#0", "block", call=0, layout="BU"), Site("block#1", "block", call=1, layout="BU")]
    with torch.no_grad():
        first = model.block(x)
        second = model.block(first)
        with Electrodes(model, sites) as el:
            model(x)
        assert torch.equal(el.data["block#0"][:, 0], first)
        assert torch.equal(el.data["block#1"][:, 0], second)
        # edit only the second call: the first is untouched, the second is zero, so the output is out(0)
        with Electrodes(model, sites, edits={"block#1": lambda v, s: torch.zeros_like(v)}) as el:
            out = model(x)
        assert torch.equal(el.data["block#0"][:, 0], first)
        assert torch.equal(out, model.out(torch.zeros_like(second)))
        # edit only the first call: the second call sees the edited input
        with Electrodes(model, sites, edits={"block#0": lambda v, s: v * 3}) as el:
            out = model(x)
        assert torch.equal(el.data["block#1"][:, 0], model.block(first * 3))
        assert torch.equal(out, model.out(model.block(first * 3)))


def test_site_without_call_index_firing_twice_raises() -> None:
    model = _seeded(Twice)
    with pytest.raises(NeuroprobeError, match="more than once"):
        with torch.no_grad(), Electrodes(model, [Site("block", "block", layout="BU")]):
            model(torch.randn(2, 5))
    assert _no_hooks(model)


def test_call_counts_restart_at_each_pass_also_through_a_submodule() -> None:
    model = _seeded(Twice)
    sites = [Site("block#0", "block", call=0, layout="BU"), Site("block#1", "block", call=1, layout="BU")]
    x1, x2 = torch.randn(2, 5), torch.randn(2, 5)
    with torch.no_grad(), Electrodes(model, sites) as el:
        model(x1)
        model(x2)
        assert torch.equal(el.data["block#0"][:, 0], model.block(x2))
        # the block called directly (not through the model) is a pass of its own
        el.data.clear()
        model.block(x1)
        model.block(x2)
    assert torch.equal(el.data["block#0"][:, 0], model.block(x2))
    assert "block#1" not in el.data


def test_xlnet_edit_on_query_stream_leaves_content_stream_alone(tiny_dir) -> None:
    import pandas as pd

    from neuroprobe.stimuli.battery import Battery

    subject = load_subject("xlnet", weights=tiny_dir("xlnet"), device="cpu", quiet=True)
    table = pd.DataFrame({"id": ["a", "b"], "concept": ["x", "x"], "modality": "text", "form": "f",
                          "split": "screening", "text": ["my grandmother", "a dog in Paris"]})
    battery = Battery.from_table(table)
    batch = subject.encode(battery.table, battery)
    sites = subject.sites("all")
    by = {s.name: s for s in sites}
    assert by["layer.0.mlp#0"].stream == "query"
    zero = lambda v, s: torch.zeros_like(v)  # noqa: E731
    with torch.inference_mode():
        with Electrodes(subject.model, sites) as clean:
            subject.forward(batch)
        with Electrodes(subject.model, sites, edits={"layer.1.mlp#0": zero}) as lesion:
            subject.forward(batch)
    assert torch.count_nonzero(lesion.data["layer.1.mlp#0"]) == 0
    # the content stream never reads the query stream: every text-stream site is unchanged
    for name, site in by.items():
        if site.stream == "text":
            assert torch.equal(clean.data[name], lesion.data[name]), name
    assert not torch.equal(clean.data["layer.1.query"], lesion.data["layer.1.query"])


def test_on_read_and_sites_to_read() -> None:
    model = _seeded(MLP)
    x = torch.randn(4, 4)
    sites = [Site("up", "up", "output", "resid", layout="BU"), Site("hidden", "down", "input", "mlp", layout="BU")]
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with Electrodes(model, sites, read=False, on_read=lambda s, v: got.__setitem__(s.name, v)) as el:
            model(x)
        assert el.data == {}
        assert torch.equal(got["up"][:, 0], model.up(x))
        assert torch.equal(got["hidden"][:, 0], model.act(model.up(x)))
        with Electrodes(model, sites, sites_to_read=["hidden"]) as el:
            model(x)
    assert set(el.data) == {"hidden"}


def test_input_site_passed_by_keyword() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(input=x)

    model = _seeded(Kw)
    x = torch.randn(2, 3)
    with torch.no_grad(), Electrodes(model, [Site("in", "lin", "input", layout="BU")],
                                      edits={"in": lambda v, s: v * 0}) as el:
        out = model(x)
    assert torch.equal(el.data["in"][:, 0], torch.zeros_like(x))
    assert torch.equal(out, model.lin.bias.expand(2, 3))
