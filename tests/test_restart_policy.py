"""The restart policy without Ray: restart_policy.decide on each kind of status, its one-line messages, the
restart budget and the clocks the supervisor feeds it (tests/test_supervision.py runs the mechanism on a real
cluster)."""
import subprocess
import sys

import pytest

from noprop_dist.distributed.restart_policy import (
    HANG_FLOOR_S,
    Clocks,
    KillServer,
    Limits,
    Restart,
    RestartBudget,
    RunStatus,
    ServerRestarted,
    ServerStatus,
    WorkerStatus,
    decide,
    hang_timeout,
)

LIMITS = Limits(hang_timeout_s=10.0, placement_timeout_s=120.0, bundle={"CPU": 1.0}, workers=2)
AUTO = Limits(hang_timeout_s=0.0, placement_timeout_s=120.0, bundle={"CPU": 1.0}, workers=2)
BUDGET = RestartBudget(per_worker=3, per_run=10)


def w(rank: int, **kw) -> WorkerStatus:
    """Worker ``rank`` of 2 on 4 blocks: blocks 1-2 or 3-4."""
    return WorkerStatus(rank, (2 * rank + 1, 2 * rank + 2), **kw)


def run(*workers: WorkerStatus, epoch: int = 1, **kw) -> RunStatus:
    return RunStatus(epoch, tuple(workers), **kw)


def test_nothing_wrong_waits():
    d = decide(run(w(0), w(1, call="done")), BUDGET, LIMITS)
    assert d.kind == "wait" and d.actions == () and d.fail is None and d.budget == BUDGET


def test_a_dead_worker_is_restarted_and_counted():
    d = decide(run(w(0), w(1, call="died", error="ActorDiedError")), BUDGET, LIMITS)
    assert d.kind == "restart" and d.fail is None
    assert d.actions == (Restart(1, "worker 1 (blocks 3-4) died in epoch 2 (ActorDiedError)", "died", 1),)
    assert d.budget.by_worker == {1: 1} and BUDGET.by_worker == {}  # a new budget; the old one unchanged
    again = decide(run(w(1, call="died", error="ActorDiedError")), d.budget, LIMITS)
    assert again.actions[0].count == 2


def test_a_worker_dead_at_the_gather_is_named_so():
    d = decide(run(w(1, call="died", error="RayActorError"), gathering=True), BUDGET, LIMITS)
    assert d.actions[0].what == ("worker 1 (blocks 3-4) died at the end of epoch 2, before its checkpoint "
                                 "(RayActorError)")


def test_a_single_block_is_named_block():
    d = decide(RunStatus(0, (WorkerStatus(2, (5,), "died", "ActorDiedError"),)), BUDGET, LIMITS)
    assert d.actions[0].what == "worker 2 (block 5) died in epoch 1 (ActorDiedError)"


def test_a_worker_that_raised_fails_the_run_after_the_deaths_before_it():
    d = decide(run(w(0, call="died", error="ActorDiedError"), w(1, call="failed", error="ValueError: bad block")),
               BUDGET, LIMITS)
    assert d.kind == "fail" and d.fail == "worker 1 (blocks 3-4) failed in epoch 2: ValueError: bad block"
    assert [a.rank for a in d.actions] == [0]  # worker 0's restart comes first, as its message


def test_past_the_restarts_of_a_worker_the_run_fails_naming_the_limit():
    budget = RestartBudget(per_worker=1, per_run=10, by_worker={0: 1})
    d = decide(RunStatus(0, (w(0, call="died", error="ActorDiedError"),)), budget, LIMITS)
    assert d.kind == "fail" and d.actions == ()
    assert d.fail == ("worker 0 (blocks 1-2) died in epoch 1 (ActorDiedError); it has died 2 times, more than "
                      "cluster.max_restarts_per_worker=1")


def test_past_the_restarts_of_the_run_the_run_fails_naming_the_limit():
    budget = RestartBudget(per_worker=3, per_run=2, by_worker={0: 1}, server=1)
    d = decide(run(w(1, call="died", error="ActorDiedError")), budget, LIMITS)
    assert d.fail == ("worker 1 (blocks 3-4) died in epoch 2 (ActorDiedError); that is restart 3 of the run, more "
                      "than cluster.max_restarts=2")


def test_restart_budget_counts_per_worker_and_per_run():
    b = RestartBudget(per_worker=2, per_run=3).worker_restarted(0).worker_restarted(1).server_restarted()
    assert b.by_worker == {0: 1, 1: 1} and b.server == 1 and b.total == 3 and b.passed("ok", 0) is None
    assert b.worker_restarted(0).passed("w0 again", 0) == \
        "w0 again; that is restart 4 of the run, more than cluster.max_restarts=3"
    b = RestartBudget(per_worker=1, per_run=10).worker_restarted(3).worker_restarted(3)
    assert b.passed("w3 twice", 3) == "w3 twice; it has died 2 times, more than cluster.max_restarts_per_worker=1"


def test_a_server_gone_for_good_fails_the_run():
    d = decide(run(w(0), server=ServerStatus(answered=False, gone="ActorDiedError: no restarts left")),
               BUDGET, LIMITS)
    assert d.fail == ("parameter server died and was not restarted (cluster.max_restarts=10): ActorDiedError: no "
                      "restarts left")


def test_a_silent_server_is_killed_after_the_hang_timeout_and_no_worker_counts_as_hung_meanwhile():
    stalled = (w(0, idle_s=50.0, answered=False), w(1, idle_s=50.0, answered=False))
    d = decide(run(*stalled, server=ServerStatus(answered=False, silent_s=12.0)), BUDGET, LIMITS)
    assert d.actions == (KillServer("parameter server did not answer for 12s; killed, Ray restarts it"),)
    assert d.kind == "wait" and d.budget == BUDGET  # Ray restarts it: counted when it answers again
    d = decide(run(*stalled, server=ServerStatus(answered=False, silent_s=8.0)), BUDGET, LIMITS)
    assert d.kind == "wait" and d.actions == ()


def test_a_restarted_server_is_counted_and_says_what_it_restored():
    d = decide(run(w(0), server=ServerStatus(restarted=True, restored_from=1, start_version=48)), BUDGET, LIMITS)
    assert d.actions == (ServerRestarted("parameter server restarted; it restored the checkpoint of epoch 1, "
                                         "version 48; workers re-sync with it", 1, 1, 48),)
    assert d.budget.server == 1 and d.kind == "wait"
    d = decide(run(server=ServerStatus(restarted=True)), RestartBudget(3, 1, by_worker={0: 1}), LIMITS)
    assert d.fail == ("parameter server restarted; it restored its initial state (no checkpoint yet), version 0; "
                      "that is restart 2 of the run, more than cluster.max_restarts=1")


def test_a_server_dead_at_the_gather_is_waited_for_up_to_the_placement_timeout():
    silent = ServerStatus(answered=False, silent_s=5.0)
    assert decide(run(server=silent, gathering=True, server_wait_s=100.0), BUDGET, LIMITS).kind == "wait"
    d = decide(run(server=silent, gathering=True, server_wait_s=121.0), BUDGET, LIMITS)
    assert d.fail == ("parameter server did not come back within 120s (cluster.placement_timeout_s) after dying "
                      "at the end of epoch 2")


def test_a_worker_without_a_node_waits_for_placement_then_fails_the_run_saying_what_fits():
    # Its bundle has no node: it cannot step, so it is not hung however long it has been idle.
    lost = w(1, idle_s=500.0, answered=False, unplaced_s=60.0)
    assert decide(run(w(0), lost), BUDGET, LIMITS).kind == "wait"
    lost = w(1, idle_s=500.0, answered=False, unplaced_s=121.0)
    d = decide(run(w(0), lost, resources={"CPU": 1.0}), BUDGET, LIMITS)
    assert d.fail == ("worker 1 (blocks 3-4) lost its node in epoch 2 and Ray found no room for its bundle "
                      "{'CPU': 1.0} within 120s (cluster.placement_timeout_s): the cluster has 1 CPU left, 2 workers "
                      "need 2 x {'CPU': 1.0}; add a node, or resume with cluster.num_workers=1 (run.dir keeps the "
                      "checkpoint of the last epoch done)")
    # A worker done with the epoch whose node is gone counts too (its states are still to be gathered).
    d = decide(run(w(0), w(1, call="done", unplaced_s=121.0)), BUDGET, LIMITS)
    assert d.fail.startswith("worker 1 (blocks 3-4) lost its node") and d.fail.endswith("add a node, or no worker fits")


def test_a_silent_stalled_worker_is_restarted_as_hung_one_still_answering_is_left_alone():
    d = decide(run(w(0, idle_s=15.0, answered=True), w(1, idle_s=15.4, answered=False)), BUDGET, LIMITS)
    assert d.actions == (Restart(1, "worker 1 (blocks 3-4) made no step for 15s in epoch 2 "
                                    "(cluster.hang_timeout_s=10)", "hung", 1),)
    assert decide(run(w(0, idle_s=9.0, answered=False), w(1)), BUDGET, LIMITS).kind == "wait"


def test_a_starting_process_gets_the_hang_floor_whatever_the_short_timeout():
    """Bug seen: under load a restarted worker took longer than cluster.hang_timeout_s=10 to start (an actor's
    start, torch's import), was found hung before its first answer, restarted again, and the run failed on the
    restart limit. Until its process answers, the timeout is HANG_FLOOR_S at least."""
    starting = w(1, idle_s=60.0, answered=False, starting=True)
    assert decide(run(w(0), starting), BUDGET, LIMITS).kind == "wait"
    assert decide(run(w(0, idle_s=60.0, starting=True), w(1, idle_s=60.0, starting=True)), BUDGET, LIMITS).kind == "wait"
    d = decide(run(w(0), w(1, idle_s=HANG_FLOOR_S + 1, answered=False, starting=True)), BUDGET, LIMITS)
    assert [(a.rank, a.cause) for a in d.actions] == [(1, "hung")]


def test_workers_all_stalled_and_answering_are_all_restarted():
    d = decide(run(w(0, idle_s=15.0), w(1, idle_s=11.0)), BUDGET, LIMITS)
    assert [(a.rank, a.cause) for a in d.actions] == [(0, "hung"), (1, "hung")]
    # One of them finished its epoch: the other may wait for it no longer (a deadlock), but one that just
    # died and is being restarted trains again, so the others are not all stalled.
    assert decide(run(w(0, idle_s=15.0), w(1, call="done")), BUDGET, LIMITS).kind == "restart"
    d = decide(run(w(0, idle_s=15.0), w(1, call="died", error="ActorDiedError")), BUDGET, LIMITS)
    assert [a.cause for a in d.actions] == ["died"]


def test_the_automatic_hang_timeout_follows_the_slowest_step_and_is_named():
    assert hang_timeout(AUTO, 3.0) == HANG_FLOOR_S and hang_timeout(AUTO, 20.0) == 200.0
    assert hang_timeout(LIMITS, 20.0) == 10.0
    silent = w(1, idle_s=150.0, answered=False)
    assert decide(run(w(0), silent, slowest_gap_s=20.0), BUDGET, AUTO).kind == "wait"
    d = decide(run(w(0), silent, slowest_gap_s=3.0), BUDGET, AUTO)
    assert d.actions[0].what == ("worker 1 (blocks 3-4) made no step for 150s in epoch 2 (automatic hang timeout "
                                 "120s; cluster.hang_timeout_s sets it)")


def test_clocks_measure_idle_time_the_slowest_gap_and_time_without_a_node():
    c = Clocks(now=0.0)
    c.started(0, 0.0)
    assert c.stepped(0, None, None, 5.0) == 5.0  # no report yet: idle since the epoch started
    assert c.stepped(0, 111, 10, 6.0) == 0.0 and c.slowest_gap_s == 0.0  # a first count: no gap measured yet
    assert c.stepped(0, 111, 10, 9.0) == 3.0
    assert c.stepped(0, 111, 12, 10.0) == 0.0 and c.slowest_gap_s == 4.0  # a step of the same process
    assert c.stepped(0, 222, 0, 30.0) == 0.0 and c.slowest_gap_s == 4.0  # a new process: not a gap
    assert c.unplaced({1}, 40.0) == {1: 0.0} and c.unplaced({1}, 70.0) == {1: 30.0}
    assert c.unplaced(set(), 80.0) == {} and c.stepped(1, None, None, 85.0) == 5.0  # placed again at 80
    c.server_answered(50.0)
    assert c.server_silent(62.0) == 12.0


def test_the_policy_imports_no_ray():
    code = ("import sys, noprop_dist.distributed.restart_policy; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("status", [run(w(0, call="died", error="E")), run(w(0, idle_s=99.0, answered=False))])
def test_decide_is_pure(status):
    assert decide(status, BUDGET, LIMITS) == decide(status, BUDGET, LIMITS) and BUDGET.by_worker == {}
