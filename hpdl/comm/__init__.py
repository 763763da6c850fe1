"""MPI communication: the rank layout (topology), pipeline point-to-point (p2p), polite waiting (wait)."""
from .p2p import PipeChannel
from .topology import Layout, Role, Topology, TopologyError, choose_layout, node_ids, place
from .wait import CommTimeout, allreduce, wait, waitall, waitany

__all__ = ["CommTimeout", "Layout", "PipeChannel", "Role", "Topology", "TopologyError", "allreduce",
           "choose_layout", "node_ids", "place", "wait", "waitall", "waitany"]
