"""Pipeline model parallelism: schedules, their simulated clock, and stage partitioning."""
from .clock import Deadlock, Event, Mismatch, SimResult, execute, simulate
from .partition import balance, describe, flop_costs, parse_partition, profile_costs, stage_bounds
from .schedules import (BACKWARD, FLUSH, FORWARD, RECV_ACT, RECV_GRAD, SCHEDULES, SEND_ACT,
                        SEND_GRAD, STEP, Action, ScheduleSpec, get_schedule, max_in_flight,
                        stash_depth)

__all__ = [
    "Action", "ScheduleSpec", "SCHEDULES", "get_schedule", "max_in_flight", "stash_depth",
    "RECV_ACT", "FORWARD", "SEND_ACT", "RECV_GRAD", "BACKWARD", "SEND_GRAD", "STEP", "FLUSH",
    "simulate", "execute", "SimResult", "Event", "Deadlock", "Mismatch",
    "parse_partition", "balance", "stage_bounds", "flop_costs", "profile_costs", "describe",
]
