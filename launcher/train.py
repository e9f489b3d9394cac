"""The main job: a DeepSpeed engine trains a timm ViT with training plug-ins (ToE) on WebDataset shards.

    python -m launcher.train --config configs/deit_tiny_toe_cpu.yaml [key=value ...]
    deepspeed --num_accelerators 2 -m launcher.train --config ...   # or torchrun / srun / mpirun

Resumes from the run folder's newest checkpoint that verifies unless --no-resume (or --resume PATH:
a checkpoint folder, which must verify, or a run folder). One job per run folder (RUN/.lock).
SIGTERM / SIGUSR1: checkpoint at the next step boundary on every rank, exit with code 75.
A signal during start-up (imports, data, checkpoint verification, DeepSpeed set-up) exits with 75 at once.
Exit codes: 0 done, 75 checkpointed on a signal (or stopped by one during start-up: run again), 2 refused
(bad recipe or checkpoint, ranks that disagree, a resume whose recipe changed, run folder in use), 3 the
loss or weights went non-finite (launcher/guard.py; not requeued), 1 failed (a rank's error, logged with its
rank; the job ends without waiting in a collective). Rank 0 also writes the code to $TOE_EXIT_FILE when set
(torchrun turns any worker's non-zero code into 1).
"""

from __future__ import annotations

import os
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal, run again to continue


def _launcher_rank() -> int:
    """This process's rank as the launcher set it, before any process group exists."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _write_exit_file(code: int) -> None:
    exit_file = os.environ.get("TOE_EXIT_FILE")
    if exit_file:
        try:
            with open(exit_file, "w") as f:
                f.write(f"{code}\n")
        except OSError as err:
            os.write(2, f"cannot write the exit code to TOE_EXIT_FILE={exit_file}: {err}\n".encode())


def _exit_during_start_up(signum, frame) -> None:
    """SIGTERM / SIGUSR1 before the step loop (imports, data, checkpoint verification, DeepSpeed set-up):
    nothing to checkpoint yet, so leave at once with 75 (the batch script requeues; the run resumes
    from its newest checkpoint). Plain writes only: this may interrupt anything, logging included."""
    rank = _launcher_rank()
    os.write(
        2,
        f"rank {rank}: signal {signum} during start-up: exiting with {EXIT_PREEMPTED} (nothing to "
        f"checkpoint yet)\n".encode(),
    )
    if rank == 0:
        _write_exit_file(EXIT_PREEMPTED)
    os._exit(EXIT_PREEMPTED)


def install_startup_signals() -> None:
    """Until the step loop's ``StopSignal`` takes over, a signal ends the process with 75."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _exit_during_start_up)


if __name__ == "__main__":  # before the heavy imports below: a job preempted while it imports torch still says 75
    install_startup_signals()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .config import ConfigError, RunConfig, deepspeed_config, grad_precision, load_config, resolved  # noqa: E402
from .run_log import RunLog, due  # noqa: E402
from .step_timer import StepTimer  # noqa: E402

log = logging.getLogger("launcher.train")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/)")
    parser.add_argument(
        "--resume",
        help="a checkpoint folder (it must verify) or a run folder (its newest checkpoint that verifies) to resume from",
    )
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if the run folder has checkpoints")
    parser.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help="resume although the recipe differs from the run folder's config.yaml in options "
        "outside launcher.config.RESUMABLE (the change is recorded in RUN/recipe_changes.jsonl)",
    )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.steps=100")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after the options


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int, warmup_lr: float, min_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` to ``peak``, then cosine to ``min_lr``: a pure function of the step."""
    if step < warmup_steps:
        return warmup_lr + (peak - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Float32 exponential moving average of a module's weights (evaluated with all tokens)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        ema = list(self.module.state_dict().values())
        live = [v.float() for v in module.state_dict().values()]
        floats = [(e, v) for e, v in zip(ema, live) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [v for _, v in floats], 1.0 - self.decay)


class StopSignal:
    """Remembers SIGTERM / SIGUSR1; ``requested(step)`` agrees across ranks (all-reduce MAX) every
    ``every`` steps only: the agreement is a collective and a host read, so checking every step
    would sync the host with the device every step. Every rank checks at the same steps."""

    def __init__(self, device: torch.device, every: int = 1) -> None:
        self.signum = 0
        self.device = device
        self.every = every
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, step: int) -> int:
        """After ``step`` steps: the signal any rank got (0: none, or not a check step)."""
        if step % self.every:
            return 0
        flag = torch.tensor([self.signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def main(argv=None) -> int:
    install_startup_signals()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.overrides)  # before any process group: a bad recipe fails here
        _check_resume_args(args)
        from .distributed import init_distributed

        env = init_distributed(cfg.train.collective_timeout_minutes)
    except ConfigError as err:
        log.error("%sbad recipe: %s", _rank_prefix(), err)  # every rank that refuses says why
        if _launcher_rank() == 0:
            _write_exit_file(2)
        return 2
    try:
        trainer = Trainer(cfg, env, args)
        code = trainer.run()
    except BaseException as err:  # noqa: BLE001 -- every failure ends the job here, without a collective
        _fail(err, env)
    dist.barrier()  # the success path only: a failed rank never waits here (``_fail``)
    dist.destroy_process_group()
    trainer.release()
    return code


def _check_resume_args(args) -> None:
    if args.resume and args.no_resume:
        raise ConfigError("--resume and --no-resume exclude each other")
    if args.resume and not Path(args.resume).exists():
        raise ConfigError(f"--resume {args.resume}: no such file or directory")


# refusals (recipe, data index, run folder lock, checkpoint verdicts, ranks that disagree): exit 2, one line,
# no traceback; anything else is logged with its traceback by every rank that meets it
def _startup_refusal(err: BaseException) -> bool:
    from data.shards import ShardIndexError

    from .checkpoint import CheckpointError
    from .runlock import RunLockedError

    return isinstance(err, (ConfigError, ShardIndexError, RunLockedError)) or (
        isinstance(err, CheckpointError) and err.collective
    )


def _rank_prefix(env=None) -> str:
    world = env.world_size if env is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = env.rank if env is not None else _launcher_rank()
    return f"rank {rank} of {world}: " if world > 1 else ""


def _fail(err: BaseException, env) -> None:
    """End this rank now: log the error with the rank, record the exit code, and leave without any
    collective (a barrier here would wait for ranks that wait in a training all-reduce: the job hung
    for ``train.collective_timeout_minutes``). The other ranks' next collective then fails within
    seconds (gloo: the peer's sockets close; NCCL: the process group is aborted here, and the
    launchers (torchrun, deepspeed, srun --kill-on-bad-exit, mpirun) end the remaining ranks).
    A verdict every rank reached together (``collective``) is logged by rank 0 only; every other
    refusal by each rank that meets it."""
    from .checkpoint import CheckpointError
    from .guard import EXIT_DIVERGED, DivergedError

    collective = bool(getattr(err, "collective", False))
    if _startup_refusal(err) or isinstance(err, DivergedError):
        code = EXIT_DIVERGED if isinstance(err, DivergedError) else 2
        if env.rank == 0 or not collective:
            from .agreement import DisagreementError

            what = (
                "refused"
                if isinstance(err, DisagreementError)
                else "bad recipe"
                if isinstance(err, ConfigError)
                else "bad checkpoint"
                if isinstance(err, CheckpointError)
                else "diverged"
                if isinstance(err, DivergedError)
                else "refused"
            )
            log.error("%s%s: %s", "" if collective else _rank_prefix(env), what, err)
    elif isinstance(err, KeyboardInterrupt):
        code = 130
        log.error("rank %d of %d: interrupted (SIGINT)", env.rank, env.world_size)
    elif isinstance(err, SystemExit) and isinstance(err.code, int):
        code = err.code
    else:
        code = 1
        log.error("rank %d of %d failed: %s: %s", env.rank, env.world_size, type(err).__name__, err, exc_info=err)
    if env.rank == 0:
        _write_exit_file(code)
    from .distributed import abort_and_exit

    abort_and_exit(code)


def _note_grad_precision(state: dict, now) -> None:
    """A resume across a change of the gradient dtype (train.grad_precision; checkpoints from before it
    existed accumulated bf16 runs' gradients in bf16) loads as is: checkpoints hold the fp32 master weights
    and optimizer moments, never gradients (DeepSpeed's ZeRO-1 and BF16_Optimizer states load into each
    other equal, tests/test_grad_precision.py). The numerics change from the resumed step on: say so."""
    saved = state.get("grad_precision", "bf16" if now is not None else None)  # older bf16 checkpoints: bf16
    if saved != now:
        log.warning(
            "the checkpoint was trained with %s gradients (train.grad_precision), this run continues with "
            "%s ones from here on; set train.grad_precision=%s to continue as it was",
            saved,
            now,
            saved,
        )


class Trainer:
    def __init__(self, cfg: RunConfig, env, args) -> None:
        from .tasks import make_task

        self.cfg, self.env, self.args = cfg, env, args
        self.task = make_task(cfg)
        self.rank, self.world = env.rank, env.world_size
        self.device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.rank != 0:
            logging.getLogger().setLevel(logging.WARNING)

    # -- set-up --------------------------------------------------------------------------------

    def _prepare_data(self):
        from data.shards import INDEX_NAME

        from .run_plan import plan_run

        d, t = self.cfg.data, self.cfg.train
        if d.synthetic:
            from data.synthetic import synthetic_geometry
            from data.write_shards import synthetic_holds, write_synthetic_once

            wanted = synthetic_geometry(d, self.cfg.model.img_size)
            if self.rank == 0 and not (Path(d.path) / INDEX_NAME).is_file():
                write_synthetic_once(d.path, **wanted)  # one complete copy even when two jobs start at once
            dist.barrier()  # on every rank, whatever it sees: a rank-local condition here would hang the job
            synthetic_holds(d.path, **wanted)  # a refusal naming the file (bad JSON) or what differs
        micro = deepspeed_config(self.cfg, self.world)["train_micro_batch_size_per_gpu"]
        self.images_per_step = micro * t.grad_accum  # this rank's; every batch is full (the stream drops the rest)
        self.train_stream, self.eval_stream = self.task.build_streams(
            micro=micro, rank=self.rank, world=self.world, pin_memory=self.device.type == "cuda"
        )
        stream = self.train_stream

        def batches(subset, micro_batch: int) -> int:  # a method's example subset (Tri-Level E-ViT) on the stream
            if subset is not None:
                stream.set_subset(subset)
            return len(stream)

        plan = plan_run(self.cfg, stream.split.total, world=self.world, batches=batches, meta_model=self._meta_model)
        self.cfg.methods = plan.methods  # resolved against the run (Budgeted Training's dense_steps)
        self.steps_per_epoch, self.total_steps = plan.steps_per_epoch, plan.total_steps

    def _prepare_data_agreed(self) -> None:
        """``_prepare_data``, then the ranks' agreement (``launcher.agreement``): one collective in which
        every rank states its recipe, shard index, step plan and view of the run folder, or the
        refusal it met, so a rank that differs stops the job within seconds, named."""
        from data.shards import ShardIndexError

        from .agreement import agree, digest, read_run_token
        from .checkpoint import complete_checkpoints

        recipe, error, facts = self.recipe, None, {}
        try:
            self._prepare_data()
        except (ConfigError, ShardIndexError) as err:
            error = err
        except FileNotFoundError as err:  # no shard index at the path (on this node)
            error = ShardIndexError(str(err))
        else:
            splits = {
                name: (list(split.urls), split.counts.tolist())
                for name, stream in (("train", self.train_stream), ("eval", self.eval_stream))
                if (split := getattr(stream, "split", None)) is not None
            }
            facts = {
                "recipe": digest(recipe),
                "shards": digest(
                    {k: ([u.rsplit("/", 1)[-1] for u in urls], counts) for k, (urls, counts) in splits.items()}
                ),
                "plan": f"{self.total_steps} steps of {self.images_per_step} images per rank, "
                f"{self.steps_per_epoch} per epoch",
                "run_folder": read_run_token(self.cfg.run_dir),
                "checkpoints": ", ".join(p.name for p in complete_checkpoints(self.cfg.run_dir)) or "none",
            }
        agree(facts, recipe=recipe, rank=self.rank, world=self.world, error=error)

    def _settle_recipe(self, point) -> None:
        """The run folder's ``config.yaml`` is the run's identity. A resume compares this start's recipe
        with it: options in ``RESUMABLE`` may change (logged, recorded in ``recipe_changes.jsonl`` with
        the step); any other change is refused (exit 2) naming each key, unless
        ``--allow-recipe-change``, which records it. Then rank 0 writes the recipe in force."""
        import yaml

        from .config import RESUMABLE, recipe_changes

        run_dir, recipe = self.cfg.run_dir, self.recipe
        path = run_dir / "config.yaml"
        changes = []
        if point is not None and path.is_file():
            try:
                found = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path} is not valid YAML ({err}); it is the run's recipe", collective=True) from None
            changes = recipe_changes(found, yaml.safe_load(recipe))
            refused = [c for c in changes if c[0] not in RESUMABLE]
            if refused and not self.args.allow_recipe_change:
                listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
                raise ConfigError(
                    f"the run in {run_dir} was trained with another recipe: {listed}. Resume with "
                    f"the run's own recipe ({path}), start a new run (another name or out_dir), or "
                    f"pass --allow-recipe-change to continue with the new values (recorded)",
                    collective=True,
                )
        if self.rank == 0:
            if changes:
                allowed = "--allow-recipe-change" if any(c[0] not in RESUMABLE for c in changes) else "resumable"
                for key, old, new in changes:
                    log.warning("recipe change at step %d: %s %r -> %r (%s)", point.step, key, old, new, allowed)
                entry = {
                    "step": point.step,
                    "time": time.time(),
                    "allowed": allowed,
                    "changes": [{"key": k, "old": o, "new": n} for k, o, n in changes],
                }
                with open(run_dir / "recipe_changes.jsonl", "a") as f:
                    f.write(json.dumps(entry, default=str) + "\n")
            tmp = run_dir / "config.yaml.tmp"  # a signal mid-write never leaves half a recipe
            tmp.write_text(recipe)
            os.replace(tmp, run_dir / "config.yaml")
        dist.barrier()

    def _meta_model(self):
        """The recipe's model on the meta device: shapes for the methods' run length, no weights."""
        with torch.device("meta"):
            return self.task.build_model(pretrained=False)[0]

    def _build(self, point):
        import deepspeed

        from methods import MethodContext, build_stack
        from models import weight_decay_groups

        from .perf import compile_engine, compile_model

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        model, num_suffix = self.task.build_model(pretrained=point is None)  # resume wins over model.checkpoint
        if point is not None and cfg.model.checkpoint and self.rank == 0:
            log.info("model.checkpoint %s is not applied: the run resumes from its own checkpoint", cfg.model.checkpoint)
        if cfg.model.grad_checkpointing:  # before the plug-ins attach: they see the model as it will run
            model.set_grad_checkpointing(True)
        context = MethodContext(
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            num_suffix=num_suffix,
            task=cfg.task,
            rank=self.rank,
            world_size=self.world,
            seed=cfg.train.seed,
            grad_accum=cfg.train.grad_accum,
        )
        self.plugins = build_stack(cfg.methods, context)
        self.plugins.attach(model, num_suffix=num_suffix)
        if self.rank == 0:
            for text in self.plugins.describe():
                log.info("%s", text)
        o = cfg.optim
        self.peak_lr = o.lr if o.lr is not None else o.base_lr * cfg.train.global_batch / 512
        fused = self.device.type == "cuda" if o.fused is None else o.fused
        optimizer = torch.optim.AdamW(
            weight_decay_groups(model, o.weight_decay), lr=self.peak_lr, betas=tuple(o.betas), eps=o.eps, fused=fused
        )
        ds_config = deepspeed_config(cfg, self.world)
        self.universal = bool(point and point.needs_universal(self.world, cfg.train.zero_stage))
        if self.universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.ema = EMA(self.engine.module, cfg.train.ema_decay) if cfg.train.ema else None
        self.plugins.on_engine(self.engine, self.ema, self.train_stream)
        if compile_model(cfg.train, self.device):
            compile_engine(self.engine, cfg.train.compile_backend, graphs=self.plugins.shape_variants())

    def _input_dtype(self) -> torch.dtype:
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        return torch.float16 if self.engine.fp16_enabled() else torch.float32

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        from .agreement import write_run_token
        from .checkpoint import Checkpointer, select_resume_point
        from .guard import NonFiniteGuard
        from .runlock import RunLock

        cfg, run_dir = self.cfg, self.cfg.run_dir
        # the recipe as given, before the methods resolve values from the data (Budgeted's dense_steps): what
        # config.yaml holds, what the ranks compare and what a resume is checked against
        self.recipe = resolved(cfg)
        if self.rank == 0:  # one job per run folder: refused before it writes anything there
            self.lock = RunLock(run_dir).acquire()
            write_run_token(run_dir)
        dist.barrier()
        self._prepare_data_agreed()
        point = (
            None
            if self.args.no_resume
            else select_resume_point(
                Path(self.args.resume or run_dir), rank=self.rank, world=self.world, required=bool(self.args.resume)
            )
        )
        self._settle_recipe(point)
        self._build(point)
        self.guard = NonFiniteGuard(self.device, loss_scaling=cfg.train.precision == "fp16")
        models = {"": self.engine.module, **({"ema.": self.ema.module} if self.ema is not None else {})}
        self.checkpointer = Checkpointer(
            run_dir,
            self.engine,
            rank=self.rank,
            world_size=self.world,
            zero_stage=cfg.train.zero_stage,
            keep=cfg.checkpoint.keep,
            before_save=lambda step: self._check_finite(step, models),
        )
        from methods.registry import progress_keys

        from .perf import peak_tflops

        self.run_log = RunLog(
            run_dir,
            rank=self.rank,
            world=self.world,
            total_steps=self.total_steps,
            log_every=cfg.train.log_every,
            device=self.device,
            guard=self.guard,
            progress_keys=progress_keys(cfg.methods),
            peak_tflops=peak_tflops(self.device, cfg.train.precision),
            counters=lambda: self.train_stream.counters,
            epoch=lambda: self.train_stream.epoch,
        )
        step = 0
        if point is not None:
            state = self.checkpointer.load(point, universal=self.universal)
            step = int(state["step"])
            self.train_stream.load_state_dict(state["stream"])
            self.plugins.load_state_dict(state["plugins"])
            if self.ema is not None and "ema" in state:
                self.ema.module.load_state_dict(state["ema"])
            _note_grad_precision(state, grad_precision(cfg))
            log.info(
                "resumed at step %d of %d (SLURM_RESTART_COUNT=%s)",
                step,
                self.total_steps,
                os.environ.get("SLURM_RESTART_COUNT", "-"),
            )
            if step >= self.total_steps:
                log.info("the run is already complete")
                return self._announce_exit(0)
            if self.rank == 0:  # a run extended past an earlier end: that end's results are not this run's
                (run_dir / "final.json").unlink(missing_ok=True)
        try:
            return self._loop(step)
        finally:
            self.run_log.close()

    def _check_finite(self, step: int, models: dict) -> None:
        """Before every checkpoint (collective): no non-finite loss since the last log step, finite weights."""
        from .guard import DivergedError

        try:
            self.guard.check(step, models)
        except DivergedError as err:
            self.run_log.diverged(step, err)
            raise

    def _client_state(self, step: int) -> dict:
        state = {
            "step": step,
            "stream": self.train_stream.state_dict(),
            "plugins": self.plugins.state_dict(),
            "seed": self.cfg.train.seed,
            "lr": self._lr(step),
            "grad_precision": grad_precision(self.cfg),
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(
            step,
            peak=self.peak_lr,
            warmup_steps=round(o.warmup_epochs * self.steps_per_epoch),
            total_steps=self.total_steps,
            warmup_lr=o.warmup_lr,
            min_lr=o.min_lr,
        )

    def _loop(self, step: int) -> int:
        """The step loop: the plug-ins' events, the task's loss, the engine; logging, evaluation and
        checkpoints are the run log's and the checkpointer's."""
        cfg, t, plugins, run_log = self.cfg, self.cfg.train, self.plugins, self.run_log
        stop, dtype, accum = StopSignal(self.device, t.signal_check_every), self._input_dtype(), 0
        run_log.start(step)
        if t.eval_on_start and step == 0:  # the starting point (e.g. a pretrained backbone), not on resume
            self._evaluate(0)
        self.engine.train()
        batches = self._batches()
        timer = StepTimer(self.device)  # time/... and memory/... of each log window, read at log steps only
        for batch in batches:
            timer.mark("data")
            if accum == 0:
                metrics, lr = plugins.on_step(step), self._set_lr(step)
            batch = plugins.on_batch(step, self.task.to_device(batch, self.device))
            outputs = self.task.forward(self.engine, batch, step * t.grad_accum + accum, dtype)
            loss = plugins.loss(step, batch, outputs, self.task.loss)  # the task's, or the one method's that owns it
            self.engine.backward(loss)
            timer.mark("forward_backward")
            self.engine.step()
            timer.mark("optimizer")
            accum = (accum + 1) % t.grad_accum
            if accum:
                continue
            plugins.after_step(step)
            if self.ema is not None:
                self.ema.update(self.engine.module)
            run_log.step(
                step,
                loss,
                lr=lr,
                images=self.images_per_step,
                flops=plugins.take_flops(),
                metrics=lambda: {**metrics, **plugins.step_metrics(), **timer.window()},
            )
            step += 1
            timer.mark("between_steps")  # the plug-ins' step end, the EMA, the run log
            if due(step, t.eval_every, self.total_steps):
                self._evaluate(step)
                timer.mark("evaluation")
            signum = stop.requested(step)
            if signum:
                self.checkpointer.save(step, self._client_state(step))
                log.warning("signal %d: checkpointed at step %d, exiting with %d", signum, step, EXIT_PREEMPTED)
                return self._announce_exit(EXIT_PREEMPTED)
            if due(step, cfg.checkpoint.every, self.total_steps):
                self.checkpointer.save(step, self._client_state(step))
                timer.mark("checkpoint")
            if step >= self.total_steps:
                break
        batches.close()  # ends the stream's DataLoader workers now
        results = self._evaluate(step)
        self.checkpointer.save(step, self._client_state(step))
        if self.rank == 0:
            (cfg.run_dir / "final.json").write_text(json.dumps({"step": step, **results}, indent=2))
        return self._announce_exit(0)

    def _batches(self):
        """Training batches, epoch after epoch; the plug-ins hear of each pass (``on_epoch``, with its
        epoch) before the stream plans it, so a subset set there is the pass's own (the stream plans a
        pass, and its workers copy the plan, at the pass's first batch; a saved state is always at the
        start or inside the epoch of the next pass)."""
        while True:
            self.plugins.on_epoch(self.train_stream.epoch, self.train_stream)
            yield from self.train_stream

    def _set_lr(self, step: int) -> float:
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _announce_exit(self, code: int) -> int:
        """Rank 0 writes the job's exit code to ``TOE_EXIT_FILE`` (set by slurm/train.sbatch) before any
        rank may exit: under ``srun --kill-on-bad-exit`` the first rank out with 75 gets the others
        killed, and srun's own exit code then no longer says that the run checkpointed on a signal."""
        if self.rank == 0:
            _write_exit_file(code)
        dist.barrier()
        return code

    def release(self) -> None:
        """Let go of the run folder (the OS does it anyway when the process ends)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    @torch.no_grad()
    def _evaluate(self, step: int) -> dict[str, float]:
        self.engine.eval()
        models = {"": (self.engine, self._input_dtype())}
        if self.ema is not None:
            models["ema_"] = (self.ema.module, torch.float32)
        results: dict[str, Any] = {}
        # a method may evaluate the models in several ways (Tri-Level: sparse, the primary "", and dense)
        for prefix, setting in self.plugins.eval_variants().items():
            with setting():
                found = self.task.evaluate(
                    models, self.eval_stream, self.device, transform=lambda batch: self.plugins.on_eval_batch(step, batch)
                )
            results.update({prefix + key: value for key, value in found.items()})
        self.engine.train()
        log.info(
            "eval at step %d: %s",
            step,
            " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()),
        )
        self.run_log.evaluation(step, results)
        return results


if __name__ == "__main__":
    from launcher.distributed import exit_process

    exit_process(main())
