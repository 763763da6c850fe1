"""Delayed-gradient and periodic-averaging algorithms as update rules on flat parameter vectors."""
from .asgd import AsgdServer, AsgdWorker
from .avg import LocalSgdWorker, avg_sync
from .base import ServerRule, WeightServer, WorkerRule
from .bmuf import bmuf_sync
from .dcasgd import DcAsgdAdaptiveServer, DcAsgdServer, GradientWorker
from .easgd import EamsgdWorker, EasgdServer, EasgdWorker, easgd_sync_center, easgd_sync_worker
from .hogwild import hogwild_apply
from .registry import ALGORITHMS, KINDS, AlgorithmError, AlgorithmSpec, Hyper, add_arguments, get, hyper_from_args
from .sync import sync_sgd

__all__ = [
    "ALGORITHMS", "KINDS", "AlgorithmError", "AlgorithmSpec", "Hyper", "add_arguments", "get",
    "hyper_from_args", "ServerRule", "WeightServer", "WorkerRule", "AsgdServer", "AsgdWorker",
    "DcAsgdServer", "DcAsgdAdaptiveServer", "GradientWorker", "EasgdServer", "EasgdWorker",
    "EamsgdWorker", "easgd_sync_worker", "easgd_sync_center", "LocalSgdWorker", "avg_sync",
    "bmuf_sync", "sync_sgd", "hogwild_apply",
]
