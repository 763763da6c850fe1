"""Pipelined EASGD and DC-ASGD (ALGORITHMS.md §8): parameter-server rules on an asynchronous, weight-stashed pipeline.

`pipelined-easgd` and `pipelined-dcasgd` run every stage with the `pipedream` schedule:
a stage updates after every micro-batch's backward, and weight stashing keeps, for each
micro-batch in flight, the weights its forward pass used (stage s keeps P - s versions),
so each gradient is exact for the weights it was computed at. Each update goes through
the stage's parameter server:

* pipelined-easgd: the local update is EASGD's (§5), x <- x - η g with g from the stashed
  weights; every τ updates the stage exchanges the elastic difference with its server.
  The stash is the "model copies kept for as many steps as the gradient is delayed".
* pipelined-dcasgd: the stage pushes g; the server applies DC-ASGD-c (§4) with w_bak
  equal to the weights g was computed at. Those are not the last weights the server sent
  (as in plain DC-ASGD) but an older reply: the one the micro-batch's forward used. So
  the server keeps, per worker, one backup for each weight version the stage stashes
  (`backup_slots`) and gives the rule `rule_worker(...)` as the worker's id.

Why `rule_worker` finds the right backup: with the stash depth D = P - s, the 1F1B order
runs the forward of micro-batch j after the update of micro-batch j - D (before any
update for j < D). So push p (micro-batch p) was computed at the server's reply to push
p - D, or at w0 for p < D. The rule stores the reply to push p in the backup row it read
for push p, row (p + 1) mod D of the worker: the reply to push p - D was stored in row
(p - D + 1) mod D = (p + 1) mod D, and rows not yet written hold w0. Hence the stage must
run as one stream of micro-batches (no drain between epochs), which this loop does.
"""
from __future__ import annotations

from ..algorithms import registry
from ..algorithms.registry import AlgorithmSpec
from ..pipeline.schedules import stash_depth

# name -> the parameter-server algorithm whose rules it runs
PIPELINED = {"pipelined-easgd": "easgd", "pipelined-dcasgd": "dcasgd-c"}
SCHEDULE = "pipedream"
NAMES = (*registry.ALGORITHMS, *PIPELINED)


def base_spec(name: str) -> AlgorithmSpec:
    """The registry algorithm whose rules and hyper-parameters `name` uses."""
    return registry.get(PIPELINED.get(name, name))


def backup_slots(name: str, stage: int, n_stages: int) -> int:
    """Backups per worker the server keeps: the stage's stash depth for pipelined-dcasgd, else 1."""
    return stash_depth(SCHEDULE, stage, n_stages) if name == "pipelined-dcasgd" else 1


def rule_worker(worker: int, pushes: int, slots: int) -> int:
    """The id under which the server rule sees `worker`'s push number `pushes` (0-based)."""
    return worker * slots + (pushes + 1) % slots
