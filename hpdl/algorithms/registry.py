"""The algorithms by name: kind, rules, and hyper-parameters with defaults, checks and CLI flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from . import asgd, avg, bmuf, dcasgd, easgd, hogwild, sync

KINDS = ("allreduce", "ps", "shared-memory")


class AlgorithmError(ValueError):
    """A user's choice of algorithm or hyper-parameter that cannot run; one line for the CLI."""


# Checks: (predicate, what the message says a value must be).
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
COUNT = (lambda v: v >= 1, ">= 1")


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter: its keyword name (flag --name-with-dashes), default and check.

    `default` is a value, or a function (n_workers, lr) -> value for defaults that depend
    on the run, described by `default_text`. `side` says which half takes it: the server
    rule (or, for allreduce algorithms, the function combining the allreduced quantity),
    the worker rule, or both.
    """

    name: str
    default: Any
    help: str
    type: type = float
    check: tuple[Callable[[Any], bool], str] | None = None
    side: str = "server"
    default_text: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe_default(self) -> str:
        return self.default_text or str(self.default)


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm: how it communicates (`kind`), its halves, and its hyper-parameters.

    ps: `server` is a ServerRule class, `worker` a WorkerRule class.
    allreduce: `server` is the function applied to the allreduced quantity (sync_sgd,
    avg_sync, bmuf_sync, easgd_sync_center); `worker` the WorkerRule class of the local
    steps, or the per-replica function (easgd_sync_worker), or None (sync).
    shared-memory: `server` is the lock-free update (hogwild_apply).
    """

    name: str
    kind: str
    section: str
    summary: str
    server: Callable
    worker: Callable | None = None
    hyper: tuple[Hyper, ...] = ()

    def resolve(self, given: dict[str, Any], n_workers: int, lr: float) -> dict[str, Any]:
        """Every hyper-parameter's value: `given` ones checked, the others defaulted."""
        names = {h.name for h in self.hyper}
        stray = [k for k in given if k not in names]
        if stray:
            takes = ", ".join(h.flag for h in self.hyper) or "no hyper-parameters"
            raise AlgorithmError(f"{'--' + stray[0].replace('_', '-')} does not apply to {self.name} "
                                 f"(it takes {takes})")
        values = {}
        for h in self.hyper:
            if h.name in given:
                value = h.type(given[h.name])
                if h.check and not h.check[0](value):
                    raise AlgorithmError(f"{h.flag} must be {h.check[1]} for {self.name}, got {value}")
            else:
                value = h.default(n_workers, lr) if callable(h.default) else h.default
            values[h.name] = value
        return values

    def server_kwargs(self, hyper: dict[str, Any]) -> dict[str, Any]:
        return {h.name: hyper[h.name] for h in self.hyper if h.side in ("server", "both")}

    def worker_kwargs(self, hyper: dict[str, Any]) -> dict[str, Any]:
        return {h.name: hyper[h.name] for h in self.hyper if h.side in ("worker", "both")}

    def make_server(self, w0, n_workers: int, hyper: dict[str, Any]):
        """The ServerRule of a ps algorithm over a copy of `w0`."""
        return self.server(w0, n_workers, **self.server_kwargs(hyper))

    def make_worker(self, w, hyper: dict[str, Any]):
        """The WorkerRule of one worker whose flat parameters are `w`."""
        return self.worker(w, **self.worker_kwargs(hyper))


TAU_HELP = "communication period: local steps between exchanges"
_TAU_AVG = Hyper("tau", avg.TAU, TAU_HELP, int, COUNT, "worker")
_TAU_EASGD = Hyper("tau", easgd.TAU, TAU_HELP, int, COUNT, "worker")
_ALPHA = Hyper("alpha", lambda n, lr: easgd.default_alpha(n), "EASGD moving rate α", float, FRACTION,
               "server", "0.9/N")

ALGORITHMS: dict[str, AlgorithmSpec] = {spec.name: spec for spec in [
    AlgorithmSpec("sync", "allreduce", "§1", "synchronous SGD on the averaged gradient", sync.sync_sgd),
    AlgorithmSpec("avg", "allreduce", "§2", "periodic model averaging every tau local SGD steps",
                  avg.avg_sync, avg.LocalSgdWorker, (_TAU_AVG,)),
    AlgorithmSpec("bmuf", "allreduce", "§2", "model averaging with (Nesterov) block momentum",
                  bmuf.bmuf_sync, avg.LocalSgdWorker, (
                      _TAU_AVG,
                      Hyper("eta_b", bmuf.ETA_B, "BMUF block momentum η_b", float, UNIT),
                      Hyper("zeta", bmuf.ZETA, "BMUF block learning rate ζ", float, POSITIVE),
                      Hyper("nesterov_bm", True, "BMUF Nesterov block momentum", bool))),
    AlgorithmSpec("easgd-sync", "allreduce", "§5", "synchronous EASGD, elastic coupling every step",
                  easgd.easgd_sync_center, easgd.easgd_sync_worker, (
                      Hyper("rho", lambda n, lr: easgd.BETA / (n * lr), "synchronous EASGD elasticity ρ",
                            float, POSITIVE, "both", "0.9/(N lr)"),)),
    AlgorithmSpec("asgd", "ps", "§3", "Downpour / asynchronous SGD", asgd.AsgdServer, asgd.AsgdWorker, (
        Hyper("n_push", 1, "Downpour: local steps between pushes", int, COUNT, "worker"),
        Hyper("n_fetch", 1, "Downpour: local steps between fetches of the weights", int, COUNT, "worker"))),
    AlgorithmSpec("dcasgd-c", "ps", "§4", "DC-ASGD, constant compensation λ",
                  dcasgd.DcAsgdServer, dcasgd.GradientWorker, (
                      Hyper("lambda_dc", dcasgd.LAMBDA_C, "DC-ASGD compensation λ (λ0 for dcasgd-a)",
                            float, NON_NEGATIVE),)),
    AlgorithmSpec("dcasgd-a", "ps", "§4", "DC-ASGD, adaptive compensation λ0/sqrt(MS+ε)",
                  dcasgd.DcAsgdAdaptiveServer, dcasgd.GradientWorker, (
                      Hyper("lambda_dc", dcasgd.LAMBDA_A, "DC-ASGD compensation λ (λ0 for dcasgd-a)",
                            float, NON_NEGATIVE),
                      Hyper("ms_decay", dcasgd.MS_DECAY, "DC-ASGD-a mean-square decay μ", float, UNIT),
                      Hyper("eps_dc", dcasgd.EPS, "DC-ASGD-a ε", float, POSITIVE))),
    AlgorithmSpec("easgd", "ps", "§5", "asynchronous EASGD", easgd.EasgdServer, easgd.EasgdWorker,
                  (_ALPHA, _TAU_EASGD)),
    AlgorithmSpec("eamsgd", "ps", "§5", "asynchronous EASGD with local Nesterov momentum",
                  easgd.EasgdServer, easgd.EamsgdWorker, (
                      _ALPHA, _TAU_EASGD,
                      Hyper("delta", easgd.DELTA, "EAMSGD local momentum δ", float, UNIT, "worker"))),
    AlgorithmSpec("hogwild", "shared-memory", "§6", "lock-free updates of one shared vector",
                  hogwild.hogwild_apply),
]}


def get(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise AlgorithmError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per hyper-parameter name of any algorithm, defaulting to None (the
    algorithm's own default); the help lists each algorithm's default."""
    seen: dict[str, list[tuple[str, Hyper]]] = {}  # name -> (algorithm, its Hyper), registry order
    for spec in ALGORITHMS.values():
        for h in spec.hyper:
            seen.setdefault(h.name, []).append((spec.name, h))
    group = parser.add_argument_group("algorithm hyper-parameters (ALGORITHMS.md)")
    for name, uses in seen.items():
        h = uses[0][1]
        defaults = ", ".join(f"{algo} {hh.describe_default()}" for algo, hh in uses)
        text = f"{h.help} (default: {defaults})"
        if h.type is bool:
            group.add_argument(h.flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(h.flag, type=h.type, default=None, metavar=name.upper(), help=text)


def hyper_names() -> list[str]:
    """Every hyper-parameter name of any algorithm, once, in registry order."""
    return list(dict.fromkeys(h.name for spec in ALGORITHMS.values() for h in spec.hyper))


def given_hyper(args: argparse.Namespace) -> dict[str, Any]:
    """The hyper-parameter flags (from `add_arguments`) that were set on the command line."""
    return {k: getattr(args, k) for k in hyper_names() if getattr(args, k, None) is not None}


def hyper_from_args(name: str, args: argparse.Namespace, n_workers: int, lr: float) -> dict[str, Any]:
    """The hyper-parameters of algorithm `name` from flags added by `add_arguments`."""
    return get(name).resolve(given_hyper(args), n_workers, lr)
