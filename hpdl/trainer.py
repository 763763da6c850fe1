"""Single-process training: the reference every distributed mode is checked against."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence


from .backend import Backend, to_host
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_into, prune, save_checkpoint
from .config import Config, ConfigError
from .data import Loader
from .layers import EVAL, Layer, Mode, accuracy, softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .layers.base import Params
from .metrics import Metrics, progress
from .models import Model, backward, build_model, forward
from .flat import Flat
from .optim import LRMethod, make_lr_method, make_optimizer
from .optim.largebatch import pack_state, restore_state
from .optim.loss_scale import LossScaler
from .precision import parse_precision
from .threads import RowThreads, default_threads, row_blocks


# Test-set batches: large, since evaluation keeps no caches.
EVAL_BATCH = 1000
SERIAL = RowThreads(1)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Updates in the run: --epochs of them, cut at --max-steps when given."""
    total = cfg.epochs * steps_per_epoch
    return min(cfg.max_steps, total) if cfg.max_steps else total


def make_run_optimizer(cfg: Config, layers: Sequence[Layer]):
    """The optimizer the run's options name, over `layers` (a model or one stage of it)."""
    name, kw = cfg.optimizer, {"weight_decay": cfg.weight_decay}
    if cfg.lr_method in ("lars", "lamb"):
        name = cfg.lr_method
    if name == "lars":
        kw |= {"momentum": cfg.momentum, "eta": cfg.trust_coefficient}
    elif name == "sgd":
        kw |= {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
    optimizer = make_optimizer(name, layers, **kw)
    optimizer.on_nonfinite = cfg.on_nonfinite
    return optimizer


def make_run_scaler(cfg: Config) -> LossScaler | None:
    """The dynamic loss scaler of an fp16 run; None for fp32 and tf32."""
    return LossScaler() if parse_precision(cfg.precision).loss_scaling else None


def make_run_lr_method(cfg: Config, layers: Sequence[Layer], replicas: int, total: int) -> LRMethod:
    """The per-layer learning rates of the run's updates, each of replicas x accumulate micro-batches."""
    return make_lr_method(cfg.lr_method, layers, cfg.lr, cfg.lr_schedule, total, replicas * cfg.accumulate,
                          cfg.warmup_steps, cfg.gain_smoothing)


def lr_record(layers: Sequence[Layer], method: LRMethod, optimizer, first: int = 0) -> dict:
    """The metrics line of one update's per-layer learning rates and gain ratios (layers with parameters),
    and for LARS and LAMB each layer's trust ratio (of its first adapted tensor; 1 for the others).

    `first` is the model index of layers[0] (a pipeline stage's first layer)."""
    names = {i: f"{first + i}:{type(layer).__name__}" for i, layer in enumerate(layers) if layer.trainable}
    record = {"layers": list(names.values()),
              **{key: [values[i] for i in names] for key, values in method.last.items()}}
    trust = getattr(optimizer, "trust", None)
    if trust is not None:
        record["trust"] = [next((trust[f"{i}/{n}"] for n in layers[i].trainable if f"{i}/{n}" in trust), 1.0)
                           for i in names]
    return record


def scaler_record(scaler: LossScaler | None) -> dict:
    """An fp16 run's loss scale and overflow skips so far, for metrics lines and RESULT; {} otherwise."""
    return {} if scaler is None else {"loss_scale": scaler.scale, "overflow_skips": scaler.overflows}


def test_loader(cfg: Config, xp, dtype) -> Loader:
    """The test split in order, every sample once."""
    return Loader(cfg.data, "test", EVAL_BATCH, shuffle=False, drop_last=False, xp=xp, dtype=dtype)


def loss_and_grads(layers: Sequence[Layer], params: Sequence[Params], x, y, key: tuple[int, ...],
                   weight: float = 1.0, on_layer=None, threads: RowThreads = SERIAL):
    """One forward and backward pass: (mean loss, per-layer gradients of weight x mean loss).

    `on_layer(i, grads_i)` is called as each layer's gradients are ready (models.backward).
    With `threads`, row blocks of the batch run at once, each weighted by its share of the
    rows, and their gradients are summed before on_layer sees them.
    """
    n = len(y)

    def block(first: int, stop: int):
        whole = stop - first == n
        logits, caches = forward(layers, params, x[first:stop], Mode(True, key, None if whole else (first, n)))
        loss, cache = softmax_cross_entropy_forward(logits, y[first:stop])
        share = (stop - first) / n
        _, grads = backward(layers, params, caches, softmax_cross_entropy_backward(cache, weight * share),
                            on_layer if whole else None, need_dx=False)
        return (loss if whole else loss * share), grads   # whole: no launch to scale by 1

    (loss, grads), *rest = threads.map(block, n)
    if not rest:
        return loss, grads
    for part, part_grads in rest:
        loss = loss + part
        for mine, theirs in zip(grads, part_grads):
            for name in mine:
                mine[name] += theirs[name]
    if on_layer is not None:
        for i in reversed(range(len(grads))):
            on_layer(i, grads[i])
    return loss, grads


def evaluate(layers: Sequence[Layer], params: Sequence[Params], loader: Loader,
             threads: RowThreads = SERIAL) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split (each batch in row blocks over `threads`)."""
    total_loss = total_correct = n = 0.0

    def block(x, y, first: int, stop: int):
        logits, _ = forward(layers, params, x[first:stop], EVAL)
        loss, _ = softmax_cross_entropy_forward(logits, y[first:stop])
        return float(loss) * (stop - first), float(accuracy(logits, y[first:stop])) * (stop - first), stop - first

    for x, y in loader.epoch(0):
        for loss, correct, b in threads.map(partial(block, x, y), len(y)):
            total_loss += loss
            total_correct += correct
            n += b
    return total_loss / n, total_correct / n


@dataclass
class Run:
    """Everything a training loop holds, built from a Config."""

    cfg: Config
    backend: Backend
    model: Model
    params: list[Params]
    optimizer: object
    lr_method: LRMethod
    train: Loader
    test: Loader
    steps_per_epoch: int
    total_steps: int
    scaler: LossScaler | None = None
    step: int = 0

    @classmethod
    def build(cls, cfg: Config, backend: Backend, replica: int = 0, replicas: int = 1) -> "Run":
        model = build_model(cfg.model, **cfg.model_options)
        xp, dtype = backend.xp, backend.dtype
        train = Loader(cfg.data, "train", cfg.batch_size, replica=replica, replicas=replicas,
                       seed=cfg.seed, xp=xp, dtype=dtype)
        spe = len(train) // cfg.accumulate
        if spe == 0:
            raise ConfigError(f"--accumulate {cfg.accumulate} x --batch-size {cfg.batch_size} x {replicas} "
                              f"replicas exceeds the training set")
        total = total_steps(cfg, spe)
        return cls(cfg, backend, model, model.init(cfg.seed, xp, dtype), make_run_optimizer(cfg, model.layers),
                   make_run_lr_method(cfg, model.layers, replicas, total), train, test_loader(cfg, xp, dtype),
                   spe, total, make_run_scaler(cfg))

    # -- checkpoints: parameters, optimizer state and the step; the loader and dropout
    #    positions follow from the step, so a resumed run repeats the same batches.
    def save(self) -> None:
        path = Path(self.cfg.checkpoint_dir) / f"step-{self.step:08d}.h5"
        host = [{k: to_host(v) for k, v in p.items()} for p in self.params]
        save_checkpoint(path, host, pack_state(self.optimizer, self.lr_method, self.scaler),
                        {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                         "config": self.cfg.to_dict()})
        prune(self.cfg.checkpoint_dir, self.cfg.keep_checkpoints)

    def restore(self) -> bool:
        path = latest_checkpoint(self.cfg.checkpoint_dir)
        if path is None:
            return False
        params, opt_state, meta = load_checkpoint(path)
        load_into(self.params, params)
        self.step = int(meta["step"])
        try:
            restore_state(self.optimizer, self.lr_method, opt_state, self.step, self.scaler)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return True


def device_checks(run: Run) -> bool:
    """Whether the optimizer checks gradients on the device (Optimizer.check_on_device): on a GPU,
    where a per-step read-back would make the host wait for every backward pass, in float32 (the
    update kernels that honour the flag), unless an fp16 loss scaler or --on-nonfinite skip needs
    each step's verdict on the host."""
    return (run.backend.is_gpu and run.backend.dtype == "float32" and run.scaler is None
            and run.optimizer.halts and run.cfg.on_nonfinite == "stop")


def train_local(cfg: Config, backend: Backend) -> dict:
    """Train in one process; returns the RESULT record."""
    run = Run.build(cfg, backend)
    if device_checks(run):
        run.optimizer.check_on_device()
    threads = RowThreads(row_blocks(cfg.thread_split, run.model.layers, cfg.threads or default_threads(),
                                    backend.device))
    try:
        with threads.blas_limit():
            return _train(run, threads)
    finally:
        threads.close()


def _train(run: Run, threads: RowThreads) -> dict:
    cfg, backend = run.cfg, run.backend
    metrics = Metrics(cfg.metrics)
    if cfg.resume and run.restore():
        print(f"resumed from step {run.step}", flush=True)
    layers, params = run.model.layers, run.params
    bar = progress(run.total_steps, run.step, cfg.progress)
    start_step, train_time = run.step, 0.0
    loss = float("nan")
    test_loss = test_acc = None
    I, norms, scaler = cfg.accumulate, run.lr_method.needs_micro_norms, run.scaler
    # Several micro-batches per update are summed in a Flat; a lone one is used as it comes.
    acc = Flat(layers, params, backend.xp, backend.dtype, stats=len(layers) if norms else 0) \
        if I > 1 or norms else None
    on_layer = (lambda i, g: acc.accumulate(i, g, 1.0 / I)) if acc is not None else None

    def test(epoch: float) -> tuple[float, float]:
        """Evaluate on the test set, off the training clock."""
        nonlocal train_time, t0
        run.optimizer.settle()
        backend.synchronize()
        train_time += time.perf_counter() - t0
        result = evaluate(layers, params, run.test, threads)
        metrics.write(kind="eval", step=run.step, epoch=epoch, test_loss=result[0], test_acc=result[1],
                      train_s=train_time)
        t0 = time.perf_counter()
        return result

    while run.step < run.total_steps:
        epoch, start = divmod(run.step, run.steps_per_epoch)
        t0 = time.perf_counter()
        batches = run.train.epoch(epoch, start * I)
        for _ in range(start, run.steps_per_epoch):
            loss = 0.0
            scale = scaler.scale if scaler is not None else 1.0
            for j in range(I):  # the micro-batches of one update, gradients summed in `acc`
                x, y = next(batches)
                part, grads = loss_and_grads(layers, params, x, y, (cfg.seed, run.step, j), scale / I, on_layer,
                                             threads)
                loss += part / I
            if acc is not None:
                grads = acc.views
            if scaler is not None:
                scaler.unscale(grads, acc.stats if norms else None)
            lr = run.lr_method.rates(grads, acc.stats if norms else None)
            if scaler is not None:
                scaler.step(run.optimizer, params, grads, lr)
            else:
                run.optimizer.step(params, grads, lr)
            if acc is not None:
                acc.vector[...] = 0
            run.step += 1
            bar.update()
            if cfg.lr_method != "none":
                metrics.write(kind="lr", step=run.step, **lr_record(layers, run.lr_method, run.optimizer))
            if run.step % cfg.log_every == 0:
                run.optimizer.settle()
                loss = float(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                metrics.write(kind="train", step=run.step, epoch=epoch, loss=loss, lr=max(lr),
                              **scaler_record(scaler))
            if cfg.checkpoint_dir and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                run.save()
            if run.step >= run.total_steps:
                break
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step % run.steps_per_epoch:
                test(run.step / run.steps_per_epoch)
        test_loss, test_acc = test(epoch + 1)
        bar.write(f"epoch {epoch + 1}: test loss {test_loss:.4f}, test accuracy {test_acc:.4f}")
        if cfg.checkpoint_dir:
            run.save()
    bar.close()
    if test_acc is None:  # resumed at the end: nothing trained, still report
        test_loss, test_acc = evaluate(layers, params, run.test, threads)
    samples = (run.step - start_step) * cfg.batch_size * I
    metrics.close()
    return {"test_acc": test_acc, "test_loss": test_loss, "train_loss": float(loss),
            "epochs": run.step / run.steps_per_epoch, "steps": run.step,
            "samples_per_s": samples / train_time if train_time else 0.0, "train_s": train_time,
            **scaler_record(scaler)}
