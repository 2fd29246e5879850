"""Observation features: SignalTracker against hand-computed values, ObservationBuilder bounds."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from conftest import make_closure, make_data, make_model, roundtrip

from rlopt import RLSwitchingOptimizer
from rlopt.control.observation import (
    BASE_FEATURES,
    FEATURE_NAMES,
    LAYOUT_VERSION,
    ObservationBuilder,
    Signals,
    observation_layout,
)
from rlopt.control.signals import SignalTracker


def _params():
    """Two parameters whose .grad are the halves of each flat gradient given."""
    ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return ps


def _set(ps, flat):
    flat = torch.tensor(flat, dtype=torch.float32)
    ps[0].grad, ps[1].grad = flat[:2].clone(), flat[2:].clone()


def _record(tracker, ps, loss):
    """One step as the optimizers account it: begin (loss and finiteness), probe, end."""
    flag = tracker.begin([p.grad for p in ps], torch.tensor(loss), torch.device("cpu"))
    tracker.probe(ps, flag)
    skipped = float(flag)  # the flag is a view of the window: read it before end() folds it
    tracker.end()
    return skipped


NAN = [float("nan")] * 4

G1 = [1.0, 2.0, -1.0, 0.0]
G2 = [2.0, -1.0, -1.0, 3.0]
G3 = [-1.0, -2.0, 1.0, 0.5]


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _sign(a, b):
    sgn = lambda v: (v > 0) - (v < 0)  # noqa: E731
    return sum(sgn(x) * sgn(y) for x, y in zip(a, b)) / len(a)


def test_alignment_of_two_known_gradients():
    # hand computed: dot = 2 - 2 + 1 + 0 = 1, |g1| = sqrt 6, |g2| = sqrt 15; signs: +1 -1 +1 0 -> 1/4
    assert _cos(G1, G2) == pytest.approx(1 / math.sqrt(90))
    assert _sign(G1, G2) == 0.25
    tracker, ps = SignalTracker(signal_every=1), _params()
    _set(ps, G1)
    _record(tracker, ps, 1.0)
    _set(ps, G2)
    _record(tracker, ps, 3.0)
    s = tracker.summary()
    assert s["grad_cosine"] == pytest.approx(1 / math.sqrt(90), rel=1e-6)
    assert s["grad_sign_agreement"] == pytest.approx(0.25)
    assert s["loss"] == pytest.approx(2.0)
    assert s["grad_norm"] == pytest.approx((math.sqrt(6) + math.sqrt(15)) / 2, rel=1e-6)
    assert s["skipped"] == 0 and s["longest_skip_run"] == 0


def test_alignment_is_sampled_every_n_steps():
    """signal_every=2: snapshot at steps 0 and 2, compare at 1 and 3 (not 2 against 1)."""
    tracker, ps = SignalTracker(signal_every=2), _params()
    for g in (G1, G2, G3, G1):
        _set(ps, g)
        _record(tracker, ps, 1.0)
    s = tracker.summary()
    assert s["grad_cosine"] == pytest.approx((_cos(G1, G2) + _cos(G3, G1)) / 2, rel=1e-6)
    assert s["grad_sign_agreement"] == pytest.approx((_sign(G1, G2) + _sign(G3, G1)) / 2)
    with_every_step = SignalTracker(signal_every=1)
    for g in (G1, G2, G3, G1):
        _set(ps, g)
        _record(with_every_step, ps, 1.0)
    s1 = with_every_step.summary()
    assert s1["grad_cosine"] == pytest.approx((_cos(G1, G2) + _cos(G2, G3) + _cos(G3, G1)) / 3, rel=1e-6)


def test_many_samples_between_decisions_match_a_hand_computation():
    """More probe rows than the buffer holds (it is folded when full), and a sample at the last
    step of an interval: its norm counts there, its comparison in the next interval."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, generator=gen).tolist() for _ in range(41)]
    tracker, ps = SignalTracker(signal_every=1, fold_every=5), _params()
    for g in grads[:40]:
        _set(ps, g)
        _record(tracker, ps, 1.0)
    first = tracker.summary()
    _set(ps, grads[40])
    _record(tracker, ps, 1.0)
    second = tracker.summary()
    norm = lambda v: math.sqrt(sum(x * x for x in v))  # noqa: E731
    pairs = list(zip(grads[:39], grads[1:40]))
    assert first["grad_norm"] == pytest.approx(sum(map(norm, grads[:40])) / 40, rel=1e-6)
    assert first["grad_cosine"] == pytest.approx(sum(_cos(a, b) for a, b in pairs) / 39, rel=1e-5)
    assert first["grad_sign_agreement"] == pytest.approx(sum(_sign(a, b) for a, b in pairs) / 39)
    assert second["grad_norm"] == pytest.approx(norm(grads[40]), rel=1e-6)
    assert second["grad_cosine"] == pytest.approx(_cos(grads[39], grads[40]), rel=1e-5)


def test_pickled_tracker_keeps_writing_into_its_window():
    tracker, ps = SignalTracker(fold_every=4), _params()
    _set(ps, G1)
    _record(tracker, ps, 2.0)
    clone = pickle.loads(pickle.dumps(tracker))
    for t in (tracker, clone):
        _set(ps, NAN)
        _record(t, ps, 4.0)
        _set(ps, G2)
        _record(t, ps, 6.0)
    a, b = tracker.summary(), clone.summary()
    assert repr(a) == repr(b)  # repr: NaN == NaN
    assert a["loss"] == pytest.approx(4.0) and a["skipped"] == 1 and a["longest_skip_run"] == 1


@pytest.mark.parametrize("fold_every", [1, 3, 8])
def test_skipped_steps_excluded_from_means_and_counted(fold_every):
    tracker, ps = SignalTracker(signal_every=1, fold_every=fold_every), _params()
    _set(ps, G1)
    assert _record(tracker, ps, 1.0) == 0.0
    _set(ps, NAN)
    assert _record(tracker, ps, 2.0) == 1.0  # non-finite gradient
    _set(ps, G3)
    assert _record(tracker, ps, float("inf")) == 1.0  # non-finite loss
    _set(ps, G2)
    _record(tracker, ps, 3.0)
    s = tracker.summary()
    assert s["loss"] == pytest.approx(2.0)
    assert s["grad_norm"] == pytest.approx((math.sqrt(6) + math.sqrt(15)) / 2, rel=1e-6)
    assert s["skipped"] == 2 and s["longest_skip_run"] == 2
    assert math.isnan(s["grad_cosine"])  # no two successive finite gradients


@pytest.mark.parametrize("fold_every", [1, 2, 3, 5, 16])
def test_skip_runs_folded_in_windows_match_step_by_step(fold_every):
    """Longest and current run of skipped steps, carried across folds and decisions."""
    pattern = [1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1]
    tracker, ps = SignalTracker(fold_every=fold_every), _params()
    cur = longest = 0
    for k, bad in enumerate(pattern):
        _set(ps, NAN if bad else G1)
        _record(tracker, ps, 1.0)
        cur = cur + 1 if bad else 0
        longest = max(longest, cur)
        if k == 9:  # a decision in the middle of a run
            s = tracker.summary()
            assert (s["skipped"], s["longest_skip_run"]) == (sum(pattern[:10]), longest)
            longest = cur
    s = tracker.summary()
    assert (s["skipped"], s["longest_skip_run"]) == (sum(pattern[10:]), longest)
    assert tracker.run[0].item() == cur


def test_check_flags_any_non_finite_tensor_and_leaves_values_alone():
    tracker = SignalTracker()
    a, b = torch.tensor([1.5, -2.0]), torch.tensor([3.0], dtype=torch.float64)
    flag = tracker.begin([a, b], None, torch.device("cpu"))
    assert float(flag) == 0.0 and torch.equal(a, torch.tensor([1.5, -2.0])) and b.item() == 3.0
    tracker.check([torch.tensor([float("-inf")]), a], flag)
    assert float(flag) == 1.0
    tracker.end()
    s = tracker.summary()
    assert s["skipped"] == 1 and math.isnan(s["loss"])


@pytest.mark.parametrize("fused_kernel", [True, False])
def test_flag_stays_one_whatever_the_path(fused_kernel):
    # fused_kernel=False: the per-device-and-dtype path with the norm fallback (devices without the kernel)
    """Fused optimizers skip a step only for found_inf == 1: several non-finite groups, a second
    check (SAM) and the fallback without GradScaler's kernel must not count past 1."""
    tracker = SignalTracker()
    if not fused_kernel:
        tracker._unfused.update({("cpu", None), ("cpu", torch.float32), ("cpu", torch.float64)})
    nan32, nan64 = torch.tensor([float("nan")]), torch.tensor([float("inf")], dtype=torch.float64)
    flag = tracker.begin([nan32, nan64], torch.tensor(float("nan")), torch.device("cpu"))
    assert float(flag) == 1.0
    tracker.check([nan32], flag)
    assert float(flag) == 1.0
    tracker.end()


def test_huge_python_loss_is_a_skipped_step_not_an_error():
    tracker = SignalTracker()
    flag = tracker.begin([torch.ones(2)], 1e39, torch.device("cpu"))
    assert float(flag) == 1.0


def test_loss_without_closure_is_not_averaged():
    tracker, ps = SignalTracker(fold_every=4), _params()
    _set(ps, G1)
    for loss in (2.0, None, 4.0):
        tracker.begin([p.grad for p in ps], None if loss is None else torch.tensor(loss), torch.device("cpu"))
        tracker.end()
    s = tracker.summary()
    assert s["loss"] == pytest.approx(3.0) and s["skipped"] == 0


def test_cancelled_step_is_not_counted():
    tracker, ps = SignalTracker(fold_every=4), _params()
    _set(ps, NAN)
    tracker.begin([p.grad for p in ps], torch.tensor(1.0), torch.device("cpu"))
    tracker.cancel()
    _set(ps, G1)
    _record(tracker, ps, 5.0)
    s = tracker.summary()
    assert s["skipped"] == 0 and s["loss"] == 5.0


def test_summary_starts_a_new_interval_but_keeps_the_current_run():
    tracker, ps = SignalTracker(), _params()
    _set(ps, NAN)
    _record(tracker, ps, 1.0)
    assert tracker.poll_skip_run() == 1
    first = tracker.summary()
    assert first["skipped"] == 1 and math.isnan(first["loss"])
    _record(tracker, ps, 1.0)
    assert tracker.poll_skip_run() == 2  # consecutive across the decision
    second = tracker.summary()
    assert second["skipped"] == 1 and second["longest_skip_run"] == 2


@pytest.mark.parametrize("fold_every", [1, 4])
def test_tracker_state_round_trip_keeps_pending_snapshot_and_window(fold_every):
    t1, ps = SignalTracker(signal_every=1, fold_every=fold_every), _params()
    _set(ps, G1)
    _record(t1, ps, 1.0)
    _set(ps, NAN)
    _record(t1, ps, 2.0)
    t2 = SignalTracker(signal_every=5)
    t2.load_state_dict(roundtrip(t1.state_dict()), torch.device("cpu"))
    for g, loss in ((G2, 3.0), (G3, 7.0)):
        _set(ps, g)
        _record(t1, ps, loss)
        _record(t2, ps, loss)
    assert t1.summary() == t2.summary()


def test_snapshot_of_a_single_gradient_is_a_copy():
    tracker = SignalTracker(signal_every=2)
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor(G1)
    _record(tracker, [p], 1.0)
    p.grad.mul_(-3.0)  # changed in place, as SAM's ascent step does
    p.grad = torch.tensor(G2)
    _record(tracker, [p], 1.0)
    assert tracker.summary()["grad_cosine"] == pytest.approx(_cos(G1, G2), rel=1e-6)


def test_tracker_states_of_another_format_are_refused():
    with pytest.raises(ValueError, match=r"lacks \['version'"):
        SignalTracker().load_state_dict({"signal_every": 10, "steps": 0, "acc": None}, torch.device("cpu"))
    state = SignalTracker().state_dict()
    with pytest.raises(ValueError, match="version 7"):
        SignalTracker().load_state_dict({**state, "version": 7}, torch.device("cpu"))
    with pytest.raises(ValueError, match="'acc' must be a tensor of shape"):
        t = SignalTracker()
        t.begin([torch.ones(2)], torch.tensor(1.0), torch.device("cpu"))
        t.end()
        SignalTracker().load_state_dict({**t.state_dict(), "acc": torch.zeros(3)}, torch.device("cpu"))


def test_bad_signal_every():
    with pytest.raises(ValueError, match="Invalid signal_every"):
        SignalTracker(0)
    with pytest.raises(ValueError, match="Invalid fold_every"):
        SignalTracker(fold_every=0)


# ------------------------------------------------------------------------ observations
ACTIONS = ("sgd", "sam", "adam")


def test_layout_names_and_version():
    from rlopt.control.observation import SAM_FEATURES

    layout = observation_layout(ACTIONS, ("extra",))
    assert layout["version"] == LAYOUT_VERSION
    assert all(isinstance(name, str) and callable(formula) for name, formula in BASE_FEATURES)
    # one declaration: names cannot drift; version 2 is version 1 and the SAM features after it
    assert FEATURE_NAMES == tuple(name for name, _ in BASE_FEATURES + SAM_FEATURES)
    assert layout["names"] == list(FEATURE_NAMES) + ["extra"] + [f"prev_action:{a}" for a in ACTIONS]


def test_observation_hand_computed_values():
    b = ObservationBuilder(ACTIONS)
    names = b.layout["names"]
    o1 = b.build(
        Signals(loss=2.0, grad_norm=1.0, val_loss=1.0, val_acc=0.5, steps=4, skipped=1, cost=1.5, progress=0.25),
        prev_action=None,
        max_cost=2.0,
    )
    o2 = b.build(
        Signals(
            loss=1.0,
            grad_norm=2.0,
            grad_cosine=0.3,
            grad_sign_agreement=-0.2,
            val_loss=0.5,
            val_acc=0.6,
            steps=4,
            cost=1.0,
            progress=0.5,
        ),
        prev_action=1,
        max_cost=2.0,
    )
    f1, f2 = dict(zip(names, o1.tolist())), dict(zip(names, o2.tolist()))
    assert f1["loss_level"] == 0.0 and f1["loss_change"] == 0.0 and f1["skipped"] == 0.25
    assert f1["cost"] == pytest.approx(0.5) and f1["progress"] == pytest.approx(-0.5) and f1["has_budget"] == 1.0
    assert f1["val_acc"] == pytest.approx(0.0) and f1["has_val"] == 1.0
    assert [f1[f"prev_action:{a}"] for a in ACTIONS] == [0.0, 0.0, 0.0]
    assert f2["loss_level"] == pytest.approx(math.tanh(math.log(0.5)))
    assert f2["loss_change"] == pytest.approx(math.tanh(5 * math.log(0.5)))
    assert f2["grad_norm_change"] == pytest.approx(math.tanh(2 * math.log(2.0)))
    assert f2["grad_cosine"] == pytest.approx(0.3) and f2["grad_sign_agreement"] == pytest.approx(-0.2)
    assert f2["val_loss_change"] == pytest.approx(math.tanh(5 * math.log(0.5)))
    assert f2["val_acc_change"] == pytest.approx(math.tanh(20 * 0.1))
    assert [f2[f"prev_action:{a}"] for a in ACTIONS] == [0.0, 1.0, 0.0]
    assert f2["cost"] == 0.0 and f2["skipped"] == 0.0


def _random_signals(g):
    def pick(choices):
        return choices[int(torch.randint(len(choices), (), generator=g))]

    wild = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e-30, 1e30, 0.5, 3.0]
    steps = int(torch.randint(0, 20, (), generator=g))
    return Signals(
        loss=pick(wild),
        grad_norm=pick(wild),
        grad_cosine=pick([math.nan, -1.0, 0.2, 1.0]),
        grad_sign_agreement=pick([math.nan, -1.0, 0.7, 1.0]),
        val_loss=pick(wild),
        val_acc=pick([math.nan, 0.0, 0.3, 1.0]),
        steps=steps,
        skipped=int(torch.randint(0, steps + 1, (), generator=g)),
        cost=pick(wild),
        progress=pick([math.nan, 0.0, 0.5, 1.0]),
    )


def test_observation_lies_in_unit_box_for_any_signals():
    g = torch.Generator().manual_seed(0)
    b = ObservationBuilder(ACTIONS)
    for k in range(300):
        obs = b.build(_random_signals(g), prev_action=k % 3 if k else None, max_cost=2.0)
        assert obs.shape == (len(b.layout["names"]),) and obs.dtype == torch.float32
        assert torch.isfinite(obs).all() and obs.abs().max() <= 1.0, obs


def test_optimizer_observations_lie_in_unit_box():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam", "adam"], policy="random", interval=2, total_steps=12
    )
    for k in range(12):
        opt.step(make_closure(model, opt, x * (10.0 if k % 5 == 0 else 1.0), y))
    assert len(opt.history) == 7
    for h in opt.history:
        assert all(-1.0 <= v <= 1.0 for v in h["observation"])
    # the tracker really measured alignment and the signals reached the observation
    names = opt.observation_layout["names"]
    last = opt.history[-1]
    assert not math.isnan(last["signals"]["grad_cosine"])
    assert last["observation"][names.index("grad_cosine")] == pytest.approx(last["signals"]["grad_cosine"], rel=1e-6)
    assert last["observation"][names.index("progress")] == pytest.approx(1.0)


def test_builder_state_round_trip():
    b1, b2 = ObservationBuilder(ACTIONS), ObservationBuilder(ACTIONS)
    b1.build(Signals(loss=2.0, grad_norm=1.0, val_loss=1.0, val_acc=0.5), None, 2.0)
    b2.load_state_dict(roundtrip(b1.state_dict()))
    s = Signals(loss=1.0, grad_norm=3.0, val_loss=0.7, val_acc=0.6)
    assert torch.equal(b1.build(s, 0, 2.0), b2.build(s, 0, 2.0))
