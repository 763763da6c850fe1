"""Run configuration: defaults, overridden by a YAML file, overridden by command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .algorithms import registry
from .algorithms.registry import AlgorithmError
from .models import DEFAULT_LR, build_model
from .precision import PRECISIONS
from .ps.pipelined import NAMES, PIPELINED, base_spec


LAMB_LR = 1e-3  # You et al. 2019's default; the models' defaults are SGD rates


MAX_THREADS = 4096  # BLAS libraries take an int; beyond any node's cores anyway
MAX_FLOPS = 1e12    # forward FLOPs per sample of the largest model the options may build


# A default --device for every run of a job or a test session (cluster scripts, make test-gpu).
DEVICE_ENV = "HPDL_DEVICE"


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
    model_options: dict = opt({}, "builder keyword arguments, e.g. {hidden: [512, 512], activation: gelu} (mlp)",
                              flag=False)
    data: str = opt("data/mnist.h5", "prepared HDF5 data set (python -m hpdl.data prepare mnist)")
    # optimization
    epochs: int = opt(10, "passes over the training set")
    max_steps: int = opt(0, "stop after this many updates (0: no limit)")
    batch_size: int = opt(128, "samples per update (per replica)")
    optimizer: str = opt("sgd", "update rule", ("sgd", "adamw"))
    lr: float = opt(0.0, "base learning rate (0: the model's default: mlp 0.05, cnn 0.02, resnet 0.05; "
                    "0.001 with --lr-method lamb)")
    lr_schedule: str = opt("cosine", "learning-rate decay", ("constant", "step", "cosine"))
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay (decoupled for adamw)")
    accumulate: int = opt(1, "micro-batch gradients each replica sums per update (gradient accumulation)")
    lr_method: str = opt("none", "large-batch learning rate: linear scaling + warm-up, LARS, LAMB, AdaScale "
                         "or LENA, for S = replicas x accumulate micro-batches per update (--warmup-steps "
                         "sets the warm-up)", ("none", "lsw", "lars", "lamb", "adascale", "lena"))
    trust_coefficient: float = opt(0.001, "LARS trust coefficient eta")
    gain_smoothing: float = opt(0.0, "weight of each new value in the gain ratios' moving averages "
                                "(adascale, lena; 0: S/1000 as in their papers)")
    seed: int = opt(0, "seed of initialization, shuffling and dropout")
    # execution
    device: str = opt("cpu", f"array backend; ${DEVICE_ENV}, when set, replaces the default", ("cpu", "gpu", "auto"))
    dtype: str = opt("float32", "floating-point type", ("float32", "float64"))
    precision: str = opt("fp32", "matrix products of Linear and Conv2d: 'fp32' in float32; 'tf32' on a GPU with "
                         "TF32 tensor cores (10-bit mantissa inputs, float32 accumulation; on the CPU the same as "
                         "fp32); 'fp16' with float16 inputs and float32 accumulation, float32 master weights and "
                         "activations, and dynamic loss scaling (from 2^15, halved with the update skipped on an "
                         "overflow, doubled after 2000 clean updates; one process, or --algorithm sync with "
                         "--stages 1)", PRECISIONS)
    threads: int = opt(0, "threads per rank (0: cores / ranks on the node)")
    thread_split: str = opt("auto", "how one process's --threads share a step: 'rows' splits each batch into "
                            "row blocks run at once, one BLAS thread each; 'blas' gives them all to BLAS; "
                            "'auto' splits convolutional nets without BatchNorm (MPI ranks always use blas)",
                            ("auto", "rows", "blas"))
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
    on_nonfinite: str = opt("stop", "on a NaN or Inf gradient: 'stop' the run naming the step and layer, "
                            "or 'skip' that update", ("stop", "skip"))
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
    eval_every: int = opt(0, "also evaluate on the test set every N steps (single process; 0: epoch ends only)")
    progress: bool = opt(True, "progress bar on rank 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields():
    return [f for f in dataclasses.fields(Config)]


def build_parser(prog: str = "python -m hpdl.train") -> argparse.ArgumentParser:
    yaml_only = "; ".join(f"{f.name}: {f.metadata['help']}" for f in _fields() if not f.metadata["flag"])
    p = argparse.ArgumentParser(
        prog=prog, description="Train a model with hpdl. Options come from --config (YAML), "
        "overridden by flags; every flag is also a YAML key (dashes become underscores).",
        epilog=f"YAML-only keys: {yaml_only}.")
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
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:  # bytes: the YAML reader detects UTF-8/16 and refuses binary data as a YAMLError
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    return data


def _check_model(cfg: Config) -> None:
    """The model the options build has positive layer shapes and a trainable size."""
    try:
        model = build_model(cfg.model, **cfg.model_options)
        shapes = model.shapes()
        flops = sum(model.flops())
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"model_options {cfg.model_options}: {e}") from None
    bad = next((s for s in shapes if not all(isinstance(d, int) and d > 0 for d in s)), None)
    if bad is not None:
        raise ConfigError(f"model_options {cfg.model_options}: gives a layer of shape {bad}; "
                          "sizes must be positive integers")
    # A layer has no more parameters than FLOPs per sample: the bound keeps NumPy from being
    # asked for arrays past any address space (its error would be a traceback, not a message).
    if flops > MAX_FLOPS:
        raise ConfigError(f"model_options {cfg.model_options}: the model takes {flops:.3g} FLOPs per sample, "
                          f"more than {MAX_FLOPS:.0e}: too large to train")


def _check_outputs(cfg: Config) -> None:
    """Output paths that cannot be written fail now, not after training."""
    for name in ("metrics", "trace", "record"):
        value = getattr(cfg, name)
        if value and Path(value).is_dir():
            raise ConfigError(f"--{name} {value}: is a directory; give a file name")
        if value and (blocker := _blocked(Path(value).parent)):
            raise ConfigError(f"--{name} {value}: cannot be created, {blocker} is not a directory")
    if cfg.checkpoint_dir and (blocker := _blocked(Path(cfg.checkpoint_dir))):
        raise ConfigError(f"--checkpoint-dir {cfg.checkpoint_dir}: {blocker} is not a directory")


def _blocked(directory: Path) -> Path | None:
    """The first of `directory` and its parents that exists but is no directory, if any."""
    for p in (directory, *directory.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


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
        path = args.pop("config")
        hyper_types = {h.name: h.type for spec in registry.ALGORITHMS.values() for h in spec.hyper}
        for key, value in load_yaml(path).items():
            key = str(key).replace("-", "_")
            if key in hyper_names:
                hyper[key] = _check_type(key, value, hyper_types[key](), path)
            elif key not in names:
                raise ConfigError(f"{path}: unknown option {key!r}")
            else:
                values[key] = _check_type(key, value, getattr(defaults, key), path)
    args.pop("config", None)
    if os.environ.get(DEVICE_ENV):   # under YAML and flags, over the built-in default
        device = os.environ[DEVICE_ENV]
        choices = next(f for f in _fields() if f.name == "device").metadata["choices"]
        if device not in choices:
            raise ConfigError(f"{DEVICE_ENV} must be one of {', '.join(choices)}, got {device!r}")
        values.setdefault("device", device)
    values.update(args)
    values["hyper"] = {**values.get("hyper", {}), **hyper, **registry.given_hyper(parsed)}
    cfg = Config(**values)
    if cfg.lr == 0 and cfg.model in DEFAULT_LR:
        cfg.lr = LAMB_LR if cfg.lr_method == "lamb" else DEFAULT_LR[cfg.model]
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for f in _fields():
        choices = f.metadata["choices"]
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(cfg, f.name)!r}")
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    positive = ("batch_size", "epochs", "log_every", "keep_checkpoints", "accumulate")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "warmup_steps", "eval_every", "checkpoint_every", "threads", "weight_decay", "stages",
                 "seed", "replicas", "ps", "microbatches"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.nesterov and cfg.momentum == 0 and cfg.optimizer == "sgd":
        raise ConfigError("--nesterov needs --momentum above 0")
    if cfg.threads > MAX_THREADS:
        raise ConfigError(f"threads must be at most {MAX_THREADS}, got {cfg.threads}")
    if cfg.lr_method in ("lars", "lamb") and cfg.optimizer != "sgd":
        raise ConfigError(f"--lr-method {cfg.lr_method} is its own update rule: leave --optimizer at sgd")
    if not 0 <= cfg.gain_smoothing <= 1:
        raise ConfigError(f"gain_smoothing must be in [0, 1], got {cfg.gain_smoothing}")
    if not cfg.trust_coefficient > 0:
        raise ConfigError(f"trust_coefficient must be positive, got {cfg.trust_coefficient}")
    if cfg.precision != "fp32" and cfg.dtype != "float32":
        raise ConfigError(f"--precision {cfg.precision} sets how float32 products are computed; use it with "
                          f"--dtype float32, not {cfg.dtype}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir")
    if not isinstance(cfg.model_options, dict):
        raise ConfigError("model_options must be a mapping")
    _check_model(cfg)
    _check_outputs(cfg)
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
    if cfg.precision == "fp16" and cfg.algorithm != "sync":
        raise ConfigError(f"--precision fp16: dynamic loss scaling supports --algorithm sync (one process, or "
                          f"--stages 1), not {cfg.algorithm}; use --precision fp32 or tf32")
    if cfg.debug_checksum and spec.kind != "allreduce":
        raise ConfigError(f"--debug-checksum compares replicas kept identical (allreduce algorithms); "
                          f"{cfg.algorithm}'s replicas differ by design")
