"""Merged checkpoints (driftlens.merges) without a model: the source syntax, the tensor arithmetic, DARE's seed."""
from __future__ import annotations

import pytest
import torch

from driftlens import merges
from driftlens.errors import UsageError
from driftlens.merges import Merge, merge_tensor, parse


def test_parse_the_source_syntax(tmp_path):
    base, ko = tmp_path / "base", tmp_path / "ko"
    base.mkdir()
    ko.mkdir()
    m = parse(f"merge:linear:0.5:{base}:{ko}")
    assert (m.method, m.alpha, m.base, m.adapted, m.density) == ("linear", 0.5, str(base), str(ko), None)
    m = parse(f"merge:ties:1,density=0.2:{ko}")                  # BASE left out: the capture's MODEL
    assert (m.method, m.alpha, m.base, m.adapted, m.density) == ("ties", 1.0, None, str(ko), 0.2)
    m = parse(f"merge:dare:0.75,density=0.3,seed=4:{base}:{ko}")
    assert (m.seed, m.density, m.recipe()) == (4, 0.3, {"method": "dare", "alpha": 0.75, "density": 0.3, "seed": 4})
    assert parse(m.spec()) == m                                  # the canonical string reads back
    odd = tmp_path / "a:b"                                       # a colon in a folder name: the split that exists
    odd.mkdir()
    assert parse(f"merge:linear:0.5:{odd}:{ko}").base == str(odd)
    assert merges.as_source(str(ko)) == str(ko) and merges.as_source(m) is m


@pytest.mark.parametrize("text, match", [
    ("merge:linear", "a merge is merge:METHOD:ALPHA"),
    ("merge:average:0.5:x", "merge method 'average'"),
    ("merge:linear:half:x", "alpha 'half' is not a number"),
    ("merge:linear:nan:x", "finite number"),
    ("merge:ties:0.5:x", "needs density="),
    ("merge:dare:0.5,density=0:x", r"density must be in \(0, 1\]"),
    ("merge:linear:0.5,density=0.5:x", "takes no density"),
    ("merge:linear:0.5,rate=2:x", "unknown merge option 'rate=2'"),
])
def test_bad_merge_strings_name_what_is_wrong(text, match):
    with pytest.raises(UsageError, match=match):
        parse(text)


def test_sweep_is_an_ordered_trajectory():
    sw = merges.sweep("ko", (0, 0.25, 0.5, 1), prefix="ko-merge")
    assert list(sw) == ["ko-merge-0", "ko-merge-0.25", "ko-merge-0.5", "ko-merge-1"]
    assert [m.alpha for m in sw.values()] == [0, 0.25, 0.5, 1.0]
    with pytest.raises(UsageError, match="given twice"):
        merges.sweep("ko", (0.5, 0.5))


def test_linear_merge_is_the_interpolation_with_exact_ends():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g)
    assert torch.equal(merge_tensor(b, a, Merge("x", 0.0)), b)
    assert torch.equal(merge_tensor(b, a, Merge("x", 1.0)), a)
    mid = merge_tensor(b, a, Merge("x", 0.3))
    torch.testing.assert_close(mid, (b.double() + 0.3 * (a.double() - b.double())).float(), rtol=0, atol=0)
    ints = torch.arange(5)
    assert torch.equal(merge_tensor(ints, ints.clone(), Merge("x", 0.5)), ints)
    with pytest.raises(UsageError, match="non-float tensor buf differs"):
        merge_tensor(ints, ints + 1, Merge("x", 0.5), "buf")
    with pytest.raises(UsageError, match="shape"):
        merge_tensor(b, a[:10], Merge("x", 0.5), "w")


def test_ties_keeps_the_largest_entries_of_the_task_vector():
    b = torch.zeros(100)
    a = torch.arange(1, 101, dtype=torch.float32) * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    got = merge_tensor(b, a, Merge("x", 0.5, "ties", density=0.2))
    kept = got != 0
    assert int(kept.sum()) == 20 and bool((a.abs()[kept] > 80).all())      # the top-20% magnitudes
    torch.testing.assert_close(got[kept], 0.5 * a[kept])


def test_dare_is_seeded_by_seed_and_tensor_name():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(400, generator=g), torch.randn(400, generator=g)
    one = merge_tensor(b, a, Merge("x", 1.0, "dare", density=0.5, seed=3), "w")
    again = merge_tensor(b, a, Merge("x", 1.0, "dare", density=0.5, seed=3), "w")
    other = merge_tensor(b, a, Merge("x", 1.0, "dare", density=0.5, seed=4), "w")
    renamed = merge_tensor(b, a, Merge("x", 1.0, "dare", density=0.5, seed=3), "v")
    assert torch.equal(one, again) and not torch.equal(one, other) and not torch.equal(one, renamed)
    kept = one != b
    assert 0.4 < kept.float().mean() < 0.6                                   # about density of the entries
    torch.testing.assert_close(one[kept], (b + (a - b) / 0.5)[kept])          # rescaled by 1 / density
    state = torch.random.get_rng_state()
    merge_tensor(b, a, Merge("x", 1.0, "dare", density=0.5, seed=3), "w")
    assert torch.equal(state, torch.random.get_rng_state())                  # the global generator untouched


class _Toy:
    """A composed source that is not a merge: sources must serve it through the protocol alone."""

    kind = "toy"

    def __init__(self):
        self.calls = []

    def spec(self):
        return "toy:1"

    def check(self, model=None):
        self.calls.append(("check", model))

    def identity(self, model=None):
        return {"kind": "toy", "fingerprint": f"toy-on-{model}"}

    def materialize(self, model=None, cache=None, allow_pickle=False, trust_remote_code=False):
        self.calls.append(("materialize", model, cache, allow_pickle, trust_remote_code))
        self.net = torch.nn.Linear(1, 1).eval()
        return self.net


def test_sources_ask_a_composed_source_about_itself(tmp_path):
    from driftlens import sources

    ko = tmp_path / "ko"
    ko.mkdir()
    m = Merge(str(ko), 0.5, base=str(ko))
    assert isinstance(m, sources.ComposedSource) and not isinstance(str(ko), sources.ComposedSource)
    assert sources.describe(m) == m.spec() == f"merge:linear:0.5:{ko}:{ko}"
    toy = _Toy()
    assert (sources.describe(toy), sources.source_kind(toy), sources.identity(toy, "base")) == (
        "toy:1", "toy", {"kind": "toy", "fingerprint": "toy-on-base"})
    assert sources.fingerprint(toy) == "toy-on-None"
    cache = {}
    net = sources.load_source(toy, base="base", cache=cache, allow_pickle=True)
    assert net is toy.net and ("materialize", "base", cache, True, False) in toy.calls
    assert toy.calls.count(("check", None)) == 4        # source_kind checks it on every entry
