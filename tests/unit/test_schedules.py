"""Pipeline schedules: every micro-batch once, messages that pair up, bounded memory, exact bubbles."""
from __future__ import annotations

import pytest

from hpdl.pipeline.clock import Deadlock, Mismatch, execute, simulate
from hpdl.pipeline.schedules import (BACKWARD, FLUSH, FORWARD, RECV_ACT, RECV_GRAD, SCHEDULES,
                                     SEND_ACT, SEND_GRAD, STEP, Action, get_schedule,
                                     max_in_flight, stash_depth)

CASES = [(name, p, m) for name in SCHEDULES for p in (1, 2, 3, 4, 8)
         for m in sorted({1, p - 1, p, 3 * p + 1} - {0})]
IDS = [f"{name}-P{p}-M{m}" for name, p, m in CASES]


def stage_actions(name: str, n_stages: int, n_micro: int) -> list[list[Action]]:
    generator = get_schedule(name).generator
    return [list(generator(s, n_stages, n_micro)) for s in range(n_stages)]


def mbs(actions: list[Action], kind: str) -> list[int]:
    return [a.mb for a in actions if a.kind == kind]


def in_flight_counts(actions: list[Action]) -> list[int]:
    """Micro-batches forwarded but not yet backwarded, after each action."""
    count, counts = 0, []
    for a in actions:
        count += (a.kind == FORWARD) - (a.kind == BACKWARD)
        counts.append(count)
    return counts


@pytest.mark.parametrize("name, p, m", CASES, ids=IDS)
def test_every_micro_batch_forwarded_then_backwarded_once_per_stage(name, p, m):
    """Each stage forwards 0..M-1 in order, backwards each exactly once, and never before its forward."""
    for actions in stage_actions(name, p, m):
        assert mbs(actions, FORWARD) == list(range(m))
        assert sorted(mbs(actions, BACKWARD)) == list(range(m))
        position = {(a.kind, a.mb): i for i, a in enumerate(actions)}
        assert all(position[(FORWARD, mb)] < position[(BACKWARD, mb)] for mb in range(m))


@pytest.mark.parametrize("name, p, m", CASES, ids=IDS)
def test_messages_pair_in_the_same_order_between_neighbours(name, p, m):
    """send_act of s pairs in order with recv_act of s+1, send_grad of s+1 with recv_grad of s."""
    stages = stage_actions(name, p, m)
    assert not mbs(stages[0], RECV_ACT) and not mbs(stages[0], SEND_GRAD)
    assert not mbs(stages[-1], SEND_ACT) and not mbs(stages[-1], RECV_GRAD)
    for s in range(p - 1):
        assert mbs(stages[s], SEND_ACT) == mbs(stages[s + 1], RECV_ACT) == list(range(m))
        assert mbs(stages[s + 1], SEND_GRAD) == mbs(stages[s], RECV_GRAD)
        assert sorted(mbs(stages[s], RECV_GRAD)) == list(range(m))


@pytest.mark.parametrize("name, p, m", CASES, ids=IDS)
def test_receives_precede_and_sends_follow_their_compute(name, p, m):
    """Each recv comes right before the compute that needs it, each send right after its producer."""
    needs = {RECV_ACT: FORWARD, RECV_GRAD: BACKWARD}
    produced_by = {SEND_ACT: FORWARD, SEND_GRAD: BACKWARD}
    for actions in stage_actions(name, p, m):
        for before, after in zip(actions, actions[1:]):
            if before.kind in needs:
                assert after == Action(needs[before.kind], before.mb)
            if after.kind in produced_by:
                assert before == Action(produced_by[after.kind], after.mb)


@pytest.mark.parametrize("name, p, m", CASES, ids=IDS)
def test_simulation_completes_without_deadlock(name, p, m):
    """All stages run their whole action lists against each other: M forwards and M backwards each."""
    result = simulate(name, p, m)
    for events in result.events:
        assert sorted(e.mb for e in events if e.kind == FORWARD) == list(range(m))
        assert sorted(e.mb for e in events if e.kind == BACKWARD) == list(range(m))


@pytest.mark.parametrize("name, p, m", CASES, ids=IDS)
def test_in_flight_micro_batches_reach_exactly_the_stated_bound(name, p, m):
    """Peak forwarded-not-backwarded micro-batches = max_in_flight: M for gpipe, else min(P - s, M)."""
    for s, actions in enumerate(stage_actions(name, p, m)):
        peak = max(in_flight_counts(actions))
        assert peak == max_in_flight(name, s, p, m)
        assert peak == (m if name == "gpipe" else min(p - s, m))


@pytest.mark.parametrize("name, p, m", CASES, ids=IDS)
def test_flushed_schedules_step_once_at_the_end_async_ones_after_every_backward(name, p, m):
    """Flush: one step(FLUSH), last. Async: step(mb) is the next compute after backward(mb), M in all."""
    for actions in stage_actions(name, p, m):
        if get_schedule(name).flush:
            assert [a for a in actions if a.kind == STEP] == [Action(STEP, FLUSH)]
            assert actions[-1] == Action(STEP, FLUSH)
        else:
            assert mbs(actions, STEP) == mbs(actions, BACKWARD)
            compute = [a for a in actions if a.kind in (FORWARD, BACKWARD, STEP)]
            for a, after in zip(compute, compute[1:]):
                assert (a.kind == BACKWARD) == (after == Action(STEP, a.mb))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("t_fwd, t_bwd", [(1.0, 2.0), (1.0, 1.0), (1.0, 3.0), (2.0, 1.0)])
def test_uniform_stages_have_the_analytic_bubble(name, t_fwd, t_bwd):
    """Makespan (M + P - 1)(t_f + t_b), so every stage's efficiency is exactly M / (M + P - 1)."""
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, p, 3 * p + 1):
            result = simulate(name, p, m, t_fwd, t_bwd)
            assert result.makespan == (m + p - 1) * (t_fwd + t_bwd)
            assert result.busy == [m * (t_fwd + t_bwd)] * p
            assert result.efficiency == [m / (m + p - 1)] * p


def test_gpipe_pays_each_link_latency_once_each_way():
    """With latency c per message the fill and the drain each cross P - 1 links: + 2 (P - 1) c."""
    p, m, c = 4, 5, 0.5
    result = simulate("gpipe", p, m, 1.0, 2.0, t_comm=c)
    assert result.makespan == (m + p - 1) * 3.0 + 2 * (p - 1) * c


def test_per_stage_times_are_honoured():
    """A list of compute times gives each stage its own busy time, and the slow stage sets the pace."""
    fast, slow = simulate("1f1b", 3, 6), simulate("1f1b", 3, 6, t_fwd=[1.0, 2.0, 1.0], t_bwd=[2.0, 4.0, 2.0])
    assert slow.busy == [18.0, 36.0, 18.0]
    assert slow.makespan > fast.makespan


def test_pipedream_without_flush_approaches_full_utilisation():
    """Over a long run the fill and drain are paid once, so async 1F1B beats flushing every mini-batch."""
    p, m, minibatches = 4, 4, 30
    run = simulate("pipedream", p, m * minibatches)
    flushed = simulate("1f1b", p, m)
    assert min(run.efficiency) == m * minibatches / (m * minibatches + p - 1) > 0.97
    assert run.makespan < minibatches * flushed.makespan


def test_step_time_is_compute_time():
    """A per-backward step costs the stage t_step each time; a flush step once."""
    assert simulate("pipedream", 2, 5, t_step=0.5).busy == [5 * 3.0 + 5 * 0.5] * 2
    assert simulate("gpipe", 2, 5, t_step=0.5).busy == [5 * 3.0 + 0.5] * 2


def test_waits_fill_exactly_the_idle_time():
    """Every stage's compute and wait events tile [0, its finish] without gaps or overlaps."""
    result = simulate("1f1b", 4, 9, t_comm=0.25)
    for events in result.events:
        assert events[0].start == 0.0
        for a, b in zip(events, events[1:]):
            assert a.end == b.start


def test_receiving_before_sending_deadlocks():
    """The oracle can fail: stage 0 waits for micro-batch 0's gradient before sending its activation."""
    stage0 = [Action(FORWARD, 0), Action(RECV_GRAD, 0), Action(SEND_ACT, 0), Action(BACKWARD, 0)]
    stage1 = [Action(RECV_ACT, 0), Action(FORWARD, 0), Action(BACKWARD, 0), Action(SEND_GRAD, 0)]
    with pytest.raises(Deadlock, match="stage 0 at recv_grad 0, stage 1 at recv_act 0"):
        execute([stage0, stage1])


def test_receiving_in_another_order_is_caught():
    """A stage whose receives are in another order than its neighbour's sends would pair wrong tensors."""
    stages = stage_actions("gpipe", 2, 2)
    swapped = [Action(a.kind, 1 - a.mb) if a.kind in (RECV_ACT, FORWARD) else a for a in stages[1]]
    with pytest.raises(Mismatch, match="recv_act 1 would receive micro-batch 0"):
        execute([stages[0], swapped])


def test_a_message_never_received_is_caught():
    """A send without its receive leaves a message behind, which is an error too."""
    stages = stage_actions("gpipe", 2, 2)
    with pytest.raises(Mismatch, match="send_act 1 is never received"):
        execute([stages[0], [a for a in stages[1] if a != Action(RECV_ACT, 1)]])


def test_stash_depth_and_flags():
    """PipeDream keeps P - s weight versions; every other schedule only the live one."""
    assert [stash_depth("pipedream", s, 4) for s in range(4)] == [4, 3, 2, 1]
    for name in ("gpipe", "1f1b", "pipelined-bp"):
        assert [stash_depth(name, s, 4) for s in range(4)] == [1, 1, 1, 1]
    assert {n for n, spec in SCHEDULES.items() if spec.flush} == {"gpipe", "1f1b"}
    assert {n for n, spec in SCHEDULES.items() if spec.stash_weights} == {"pipedream"}


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(ValueError, match="unknown schedule 'zb'; choose one of gpipe, 1f1b"):
        simulate("zb", 2, 2)
    with pytest.raises(ValueError, match=r"stage 3 is not in 0..2"):
        list(get_schedule("1f1b").generator(3, 3, 4))
    with pytest.raises(ValueError, match="n_micro must be at least 1"):
        max_in_flight("gpipe", 0, 2, 0)
    with pytest.raises(ValueError, match="t_fwd must be one non-negative time or 2 of them"):
        simulate("gpipe", 2, 2, t_fwd=[1.0])
