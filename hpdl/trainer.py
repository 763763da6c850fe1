"""Single-process training: the reference every distributed mode is checked against."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from .backend import Backend, to_host
from .checkpoint import latest_checkpoint, load_checkpoint, load_into, prune, save_checkpoint
from .config import Config
from .data import Loader
from .layers import EVAL, Layer, Mode, accuracy, softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .layers.base import Params
from .metrics import Metrics, progress
from .models import Model, backward, build_model, forward
from .optim import make_optimizer, make_schedule


# Test-set batches: large, since evaluation keeps no caches.
EVAL_BATCH = 1000


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Updates in the run: --epochs of them, cut at --max-steps when given."""
    total = cfg.epochs * steps_per_epoch
    return min(cfg.max_steps, total) if cfg.max_steps else total


def make_run_optimizer(cfg: Config, layers: Sequence[Layer]):
    """The optimizer the run's options name, over `layers` (a model or one stage of it)."""
    kw = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kw |= {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
    return make_optimizer(cfg.optimizer, layers, **kw)


def test_loader(cfg: Config, xp, dtype) -> Loader:
    """The test split in order, every sample once."""
    return Loader(cfg.data, "test", EVAL_BATCH, shuffle=False, drop_last=False, xp=xp, dtype=dtype)


def loss_and_grads(layers: Sequence[Layer], params: Sequence[Params], x, y, key: tuple[int, ...]):
    """One forward and backward pass: (mean loss, per-layer gradients)."""
    logits, caches = forward(layers, params, x, Mode(True, key))
    loss, cache = softmax_cross_entropy_forward(logits, y)
    _, grads = backward(layers, params, caches, softmax_cross_entropy_backward(cache), need_dx=False)
    return loss, grads


def evaluate(layers: Sequence[Layer], params: Sequence[Params], loader: Loader) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split."""
    total_loss = total_correct = n = 0.0
    for x, y in loader.epoch(0):
        logits, _ = forward(layers, params, x, EVAL)
        loss, _ = softmax_cross_entropy_forward(logits, y)
        b = len(y)
        total_loss += float(loss) * b
        total_correct += float(accuracy(logits, y)) * b
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
    schedule: object
    train: Loader
    test: Loader
    steps_per_epoch: int
    total_steps: int
    step: int = 0

    @classmethod
    def build(cls, cfg: Config, backend: Backend, replica: int = 0, replicas: int = 1) -> "Run":
        model = build_model(cfg.model, **cfg.model_options)
        xp, dtype = backend.xp, backend.dtype
        train = Loader(cfg.data, "train", cfg.batch_size, replica=replica, replicas=replicas,
                       seed=cfg.seed, xp=xp, dtype=dtype)
        spe = len(train)
        total = total_steps(cfg, spe)
        return cls(cfg, backend, model, model.init(cfg.seed, xp, dtype), make_run_optimizer(cfg, model.layers),
                   make_schedule(cfg.lr_schedule, cfg.lr, total, warmup_steps=cfg.warmup_steps),
                   train, test_loader(cfg, xp, dtype), spe, total)

    # -- checkpoints: parameters, optimizer state and the step; the loader and dropout
    #    positions follow from the step, so a resumed run repeats the same batches.
    def save(self) -> None:
        path = Path(self.cfg.checkpoint_dir) / f"step-{self.step:08d}.h5"
        host = [{k: to_host(v) for k, v in p.items()} for p in self.params]
        save_checkpoint(path, host, self.optimizer.state_dict(),
                        {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                         "config": self.cfg.to_dict()})
        prune(self.cfg.checkpoint_dir, self.cfg.keep_checkpoints)

    def restore(self) -> bool:
        path = latest_checkpoint(self.cfg.checkpoint_dir)
        if path is None:
            return False
        params, opt_state, meta = load_checkpoint(path)
        load_into(self.params, params)
        self.optimizer.load_state_dict(opt_state)
        self.step = int(meta["step"])
        return True


def train_local(cfg: Config, backend: Backend) -> dict:
    """Train in one process; returns the RESULT record."""
    run = Run.build(cfg, backend)
    metrics = Metrics(cfg.metrics)
    if cfg.resume and run.restore():
        print(f"resumed from step {run.step}", flush=True)
    layers, params = run.model.layers, run.params
    bar = progress(run.total_steps, run.step, cfg.progress)
    start_step, train_time = run.step, 0.0
    loss = float("nan")
    test_loss = test_acc = None
    while run.step < run.total_steps:
        epoch, start = divmod(run.step, run.steps_per_epoch)
        t0 = time.perf_counter()
        for x, y in run.train.epoch(epoch, start):
            lr = run.schedule(run.step)
            loss, grads = loss_and_grads(layers, params, x, y, (cfg.seed, run.step))
            run.optimizer.step(params, grads, lr)
            run.step += 1
            bar.update()
            if run.step % cfg.log_every == 0:
                loss = float(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                metrics.write(kind="train", step=run.step, epoch=epoch, loss=loss, lr=lr)
            if cfg.checkpoint_dir and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                run.save()
            if run.step >= run.total_steps:
                break
        backend.synchronize()
        train_time += time.perf_counter() - t0
        test_loss, test_acc = evaluate(layers, params, run.test)
        metrics.write(kind="eval", step=run.step, epoch=epoch + 1, test_loss=test_loss, test_acc=test_acc)
        bar.write(f"epoch {epoch + 1}: test loss {test_loss:.4f}, test accuracy {test_acc:.4f}")
        if cfg.checkpoint_dir:
            run.save()
    bar.close()
    if test_acc is None:  # resumed at the end: nothing trained, still report
        test_loss, test_acc = evaluate(layers, params, run.test)
    samples = (run.step - start_step) * cfg.batch_size
    metrics.close()
    return {"test_acc": test_acc, "test_loss": test_loss, "train_loss": float(loss),
            "epochs": run.step / run.steps_per_epoch, "steps": run.step,
            "samples_per_s": samples / train_time if train_time else 0.0, "train_s": train_time}
