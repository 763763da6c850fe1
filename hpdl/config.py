"""Run configuration: defaults, overridden by a YAML file, overridden by command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .algorithms import registry
from .algorithms.registry import AlgorithmError
from .models import DEFAULT_LR
from .ps.pipelined import NAMES, PIPELINED, base_spec


class ConfigError(ValueError):
    """A user's configuration that cannot run; its message is one line for the CLI."""


def opt(default: Any, help: str, choices: tuple | None = None, flag: bool = True):
    """A config field; `flag=False` keeps it YAML-only (nested values)."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # model and data
    model: str = opt("mlp", "architecture", ("mlp", "cnn", "resnet"))
    model_options: dict = opt({}, "builder keyword arguments, e.g. {hidden: [512, 512]}",
                              flag=False)
    data: str = opt("data/mnist.h5", "prepared HDF5 data set (python -m hpdl.data prepare mnist)")
    # optimization
    epochs: int = opt(10, "passes over the training set")
    max_steps: int = opt(0, "stop after this many updates (0: no limit)")
    batch_size: int = opt(128, "samples per update (per replica)")
    optimizer: str = opt("sgd", "update rule", ("sgd", "adamw"))
    lr: float = opt(0.0, "base learning rate (0: the model's default: mlp 0.05, cnn 0.02, resnet 0.05)")
    lr_schedule: str = opt("cosine", "learning-rate decay", ("constant", "step", "cosine"))
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay (decoupled for adamw)")
    seed: int = opt(0, "seed of initialization, shuffling and dropout")
    # execution
    device: str = opt("cpu", "array backend", ("cpu", "gpu", "auto"))
    dtype: str = opt("float32", "floating-point type", ("float32", "float64"))
    threads: int = opt(0, "BLAS threads per rank (0: cores / ranks on the node)")
    # parallel layout (mpirun -np N): N = stages x replicas + ps
    stages: int = opt(0, "pipeline stages (0: chosen from the world size and the model)")
    replicas: int = opt(0, "data-parallel replicas of each stage (0: world size / stages)")
    ps: int = opt(0, "parameter-server ranks (parameter-server algorithms)")
    # how replicas combine their work (ALGORITHMS.md, docs/hyperparallel.md)
    algorithm: str = opt("sync", "update rule across replicas; asgd, dcasgd-c, dcasgd-a, easgd, eamsgd and "
                         "the pipelined-* ones need --ps", NAMES)
    hyper: dict = opt({}, "the algorithm's hyper-parameters; each is also a flag and a top-level YAML key "
                      "(--tau 10, tau: 10)", flag=False)
    record: str = opt("", "write the parameter server's update order here (HDF5 delay log) for "
                      "python -m hpdl.simulate --delay log:FILE")
    debug_checksum: int = opt(0, "every N synchronisations check that the replicas' weights are bitwise "
                              "equal (allreduce algorithms; 0: off)")
    partition: str = opt("auto", "layers per stage: 'auto' (timed profile), 'flops', or counts like 4,3,3")
    schedule: str = opt("1f1b", "pipeline schedule", ("gpipe", "1f1b", "pipedream", "pipelined-bp"))
    microbatches: int = opt(0, "micro-batches per mini-batch (0: 2 x stages, 1 for one stage)")
    poll: str = opt("sleep", "how a rank waits for MPI: 'sleep' yields the core (oversubscribed runs)",
                    ("sleep", "spin"))
    trace: str = opt("", "write a Chrome/Perfetto trace JSON of every rank's events here")
    # output
    metrics: str = opt("", "append JSON-lines metrics to this file")
    checkpoint_dir: str = opt("", "write checkpoints here")
    checkpoint_every: int = opt(0, "checkpoint every N steps (0: each epoch end only)")
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep")
    resume: bool = opt(False, "continue from the newest checkpoint in --checkpoint-dir")
    log_every: int = opt(50, "write a metrics line every N steps")
    progress: bool = opt(True, "progress bar on rank 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields():
    return [f for f in dataclasses.fields(Config)]


def build_parser(prog: str = "python -m hpdl.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a model with hpdl. Options come from --config (YAML), "
        "overridden by flags; every flag is also a YAML key (dashes become underscores).",
)
    p.add_argument("--config", help="YAML file of options")
    defaults = Config()
    for f in _fields():
        if not f.metadata["flag"]:
            continue
        name = "--" + f.name.replace("_", "-")
        kind = type(getattr(defaults, f.name))
        kw: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})",
                              "default": argparse.SUPPRESS}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            kw["choices"] = f.metadata["choices"]
            kw["metavar"] = f.name.upper() if not f.metadata["choices"] else None
        p.add_argument(name, **kw)
    registry.add_arguments(p)
    return p


def _check_type(name: str, value: Any, default: Any, source: str) -> Any:
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value


def load_yaml(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    return data


def make_config(argv: list[str] | None = None) -> Config:
    """Defaults <- YAML (--config) <- flags, type-checked and validated.

    Hyper-parameters (registry names like tau) are flags and top-level YAML keys of their
    own; they are collected into `hyper`, flags over YAML.
    """
    parsed = build_parser().parse_args(argv)
    hyper_names = set(registry.hyper_names())
    args = {k: v for k, v in vars(parsed).items() if k not in hyper_names}
    values: dict[str, Any] = {}
    hyper: dict[str, Any] = {}
    defaults = Config()
    names = {f.name for f in _fields()}
    if args.get("config"):
        for key, value in load_yaml(args.pop("config")).items():
            key = str(key).replace("-", "_")
            if key in hyper_names:
                hyper[key] = value
            elif key not in names:
                raise ConfigError(f"{args.get('config', 'config')}: unknown option {key!r}")
            else:
                values[key] = _check_type(key, value, getattr(defaults, key), "config")
    args.pop("config", None)
    values.update(args)
    values["hyper"] = {**values.get("hyper", {}), **hyper, **registry.given_hyper(parsed)}
    cfg = Config(**values)
    if cfg.lr == 0 and cfg.model in DEFAULT_LR:
        cfg.lr = DEFAULT_LR[cfg.model]
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for f in _fields():
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(cfg, f.name)!r}")
    positive = ("batch_size", "epochs", "log_every", "keep_checkpoints")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "warmup_steps", "checkpoint_every", "threads", "weight_decay", "stages",
                 "replicas", "ps", "microbatches"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir")
    if not isinstance(cfg.model_options, dict):
        raise ConfigError("model_options must be a mapping")
    if cfg.debug_checksum < 0:
        raise ConfigError(f"debug_checksum must not be negative, got {cfg.debug_checksum}")
    validate_algorithm(cfg)


def validate_algorithm(cfg: Config) -> None:
    """The algorithm, its hyper-parameters and the options that go with it (the layout is checked later)."""
    spec = base_spec(cfg.algorithm)
    try:
        # The number of workers is not known yet: 1 stands in, for the checks of given values.
        hyper = spec.resolve(cfg.hyper, 1, cfg.lr)
    except AlgorithmError as e:
        raise ConfigError(str(e)) from None
    except (ValueError, TypeError) as e:  # a YAML value of the wrong type
        raise ConfigError(f"{cfg.algorithm} hyper-parameters: {e}") from None
    ps_names = ", ".join(n for n in NAMES if base_spec(n).kind == "ps")
    replayable = ", ".join(n for n, sp in registry.ALGORITHMS.items() if sp.kind == "ps")
    if spec.kind == "ps" and not cfg.ps:
        raise ConfigError(f"{cfg.algorithm} needs parameter-server ranks: add --ps 1 (one rank more)")
    if spec.kind != "ps" and cfg.ps:
        raise ConfigError(f"--ps serves parameter-server algorithms ({ps_names}); {cfg.algorithm} is "
                          f"{spec.kind}: use --ps 0")
    if cfg.record and (spec.kind != "ps" or cfg.algorithm in PIPELINED):
        raise ConfigError(f"--record logs a parameter server's updates for the simulator to replay "
                          f"({replayable}), not {cfg.algorithm}'s")
    if cfg.record and hyper.get("n_fetch", 1) != hyper.get("n_push", 1):
        raise ConfigError("--record: a delay log ties each fetch to a push; use --n-fetch equal to --n-push")
    if cfg.debug_checksum and spec.kind != "allreduce":
        raise ConfigError(f"--debug-checksum compares replicas kept identical (allreduce algorithms); "
                          f"{cfg.algorithm}'s replicas differ by design")
