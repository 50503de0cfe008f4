"""The training run: `train_and_evaluate(config, workdir)`, in named sections always in this
order: mesh, data, noise schedule, model (abstract), shardings, params (restore > init_from >
random), step, loop. `python -m pbe_jax.train` is its command line.
"""
from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from pbe_jax import checkpoint, runtime
from pbe_jax import sharding as shd
from pbe_jax.checkpoint import Checkpointer
from pbe_jax.convert.load import load_pipeline, load_scheduler_config
from pbe_jax.convert.orbax_io import scheduler_of_run
from pbe_jax.data.pipeline import make_loader
from pbe_jax.data.prefetch import DevicePrefetch
from pbe_jax.evaluation.benchmark import training_eval
from pbe_jax.evaluation.exemplar import ExemplarEval
from pbe_jax.metrics import (MetricWriter, check_workdir_backend, image_grid, last_logged_step,
                             peak_flops_per_device, readable)
from pbe_jax.outputs import atomic_write, ensure_writable
from pbe_jax.training import guards
from pbe_jax.training.goodput import Goodput
from pbe_jax.training.preemption import Preemption
from pbe_jax.training.lora import cast_base, log_trainable, lora_enabled, with_lora
from pbe_jax.training.samples import training_samples
from pbe_jax.training.state import Setup, config_runtime, step_flops
from pbe_jax.training.vae_fit import frozen_with_vae, run_vae_stage
from pbe_jax.training.watchdog import Watchdog

log = logging.getLogger("pbe_jax")


def resolve_noise_schedule(config: ml_collections.ConfigDict, ckpt: Checkpointer) -> dict:
    """Fix `config.model.scheduler`, the run's one noise schedule, before anything uses it: a
    run that has checkpoints keeps the schedule it trained with; a new run initialised from a
    checkpoint (`config.init_from`) takes that checkpoint's scheduler config (an SD 2.x
    v-prediction init stays v-prediction); otherwise the config's own. Returns it."""
    current = config.model.scheduler.to_dict()
    found, source = None, ""
    steps = ckpt.steps()
    for step in reversed(steps):  # newest readable: restore moves corrupt steps aside and says so
        step_dir = checkpoint.step_dir(ckpt.directory, step)
        try:
            found, source = scheduler_of_run(checkpoint.read_config(step_dir)), f"checkpoint {step_dir}"
            break
        except Exception as e:  # noqa: BLE001
            log.warning("cannot read the noise schedule of %s (%s)", step_dir, e)
    if not steps and config.init_from.format:
        found = load_scheduler_config(config.init_from.format, config.init_from.path)
        source = f"init_from {config.init_from.format}:{config.init_from.path}"
    if found and found != current:
        log.info("noise schedule from %s: %s", source, json.dumps(found, sort_keys=True))
        with config.unlocked():
            config.model.scheduler = ml_collections.ConfigDict(found)
    return config.model.scheduler.to_dict()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _init_params(setup: Setup, config):
    """Precedence when the workdir has no checkpoint: config.init_from > random init."""
    fmt = config.init_from.format
    if not fmt:
        log.info("init: random (config.init_from.format is empty)")
        return setup.random_params()
    log.info("init: %s from %s", fmt, config.init_from.path)
    model = load_pipeline(fmt, config.init_from.path, clip=config.init_from.clip or None,
                          model_config=config.model, place=setup.place_fn(), seed=config.seed,
                          **config_runtime(config))
    if lora_enabled(config):  # adapters on the loaded base, placed as training shards them
        with_lora(model, config)
        _, p, f, _ = nnx.split(model, setup.trainable, setup.frozen, ...)
        return (jax.device_put(nnx.to_pure_dict(p), setup.params_sharding),
                cast_base(jax.device_put(nnx.to_pure_dict(f), setup.frozen_sharding), config))
    _, p, f, _ = nnx.split(model, setup.trainable, setup.frozen, ...)
    return nnx.to_pure_dict(p), nnx.to_pure_dict(f)


def _lora_base(setup: Setup, config, vae_dir):
    """The frozen params of a resumed LoRA run, from the run's base as at its start."""
    log.info("LoRA resume: base reloaded from %s", f"{config.init_from.format}:{config.init_from.path}"
             if config.init_from.format else f"random init (seed {config.seed})")
    frozen = _init_params(setup, config)[1]
    return frozen_with_vae(frozen, vae_dir, setup.place_fn()) if vae_dir else frozen


def _input_grid(batch) -> np.ndarray:
    """Training inputs at step 0: image, masked image, reference (first 4 local samples)."""
    loc = {k: np.asarray(v.addressable_shards[0].data if hasattr(v, "addressable_shards") else v)[:4]
           for k, v in batch.items()}
    img = loc["image"].astype(np.float32) / 255
    mask = loc["mask"].astype(np.float32) / 255
    ref = loc["reference"].astype(np.float32) / 255
    h = img.shape[1]
    ref = np.stack([np.asarray(jax.image.resize(r, (h, h, 3), "linear")) for r in ref])
    return readable(image_grid([img, img * mask + 0.5 * (1 - mask), ref]))


def _refuse_lost_history(workdir: str, had_checkpoints: bool, config) -> None:
    """No checkpoint restores and there is none to restore: start at step 0, unless
    `metrics.jsonl` shows that this run did finish a checkpoint (then they were deleted or
    moved, and starting over would silently drop the history). Rows up to 2 * ckpt_every_steps
    can predate the first finished checkpoint (the save at 2k waits for the one at k); every
    run creates `checkpoints/` before its first step."""
    logged = last_logged_step(workdir)
    if not logged:
        return
    ckdir = checkpoint.ckpt_dir(workdir)
    if had_checkpoints and logged <= 2 * config.ckpt_every_steps:
        log.warning("%s/metrics.jsonl has steps up to %d but no checkpoint was finished: the run "
                    "was stopped before its first one; starting again from step 0", workdir, logged)
        return
    where = "does not exist" if not had_checkpoints else "holds no checkpoint"
    raise checkpoint.CheckpointError(
        f"{workdir}/metrics.jsonl records training up to step {logged}, but {ckdir} {where}: the "
        "run's checkpoints were deleted or moved, and starting again from step 0 would silently "
        f"discard that history. To continue the run, put its checkpoints back in {ckdir}; to "
        f"start over, use a new --workdir or delete {workdir}/metrics.jsonl.")


@guards.holds_workdir_lock  # one writer per workdir; takes `reclaim_lock=`
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       clock: runtime.StartupClock | None = None) -> dict:
    """Train `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics.
    `clock`: the command line's start-up clock; the sections up to the end of the first step
    are marked on it and logged as one 'start-up' line (and `startup/*` metrics). The whole run
    holds WORKDIR's lock (`guards.holds_workdir_lock`; `reclaim_lock=True` takes over one left
    on another host)."""
    clock = clock or runtime.StartupClock(first=None)
    watchdog = Watchdog.for_config(config)  # a dead peer or a stalled step ends the run, not a hang
    check_workdir_backend(workdir)  # a gs:// workdir without its packages fails here, naming them
    ensure_writable(workdir, "--workdir")  # local or gs://; before any compute
    had_checkpoints = epath.Path(checkpoint.ckpt_dir(workdir)).is_dir()
    guards.check_steps_left(config, workdir)  # past num_steps: refused before any compute
    # ---- mesh
    mesh = shd.make_mesh(config.mesh)
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
    shd.check_batch_size(config.train.batch_size, mesh, jax.process_count(), what="config.train.batch_size")
    clock.mark("mesh")
    # ---- data
    loader = make_loader(config.data, global_batch_size=config.train.batch_size, seed=config.seed,
                         mesh=mesh)
    clock.mark("data")
    # ---- model (abstract) and shardings; the run's noise schedule is fixed first
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    resolve_noise_schedule(config, ckpt)
    clock.mark("checkpointer")
    vae_dir = run_vae_stage(config, workdir, mesh, ckpt)  # config.vae_fit: fits WORKDIR/vae first
    clock.mark("vae_stage")
    setup = Setup(config, mesh)
    clock.mark("abstract model")
    writer = MetricWriter(workdir)
    # ---- params. Precedence: workdir checkpoint > config.init_from > random init.
    # A LoRA run's checkpoints hold no frozen params: its base is reloaded from where it came.
    lora = lora_enabled(config)
    restored = ckpt.restore_latest(setup.abstract_state(), None if lora else setup.abstract_frozen(),
                                   json.loads(config.to_json())) if ckpt.steps() else None
    if restored is not None:
        step0, r = restored
        state, frozen = r.state, (_lora_base(setup, config, vae_dir) if lora else r.frozen)
        if r.data:
            loader.set_state(r.data)
        log.info("resumed from %s/%d", ckpt.directory, step0)
        guards.config_changes_on_resume(r.config, config, step0)
        guards.write_config(config, workdir)  # config.json follows the run's current config
    else:
        _refuse_lost_history(workdir, had_checkpoints, config)
        params, frozen = _init_params(setup, config)
        if vae_dir:
            frozen = frozen_with_vae(frozen, vae_dir, setup.place_fn())
        state = setup.new_state(params)
        step0 = 0
        guards.write_config(config, workdir)
    log_trainable(state["params"], frozen)
    writer.keep_until(step0)  # the rows past step0 are logged again
    jax.block_until_ready((state, frozen))
    clock.mark("params restore" if restored is not None else "params init")
    # ---- step. The next batches are read and placed on devices while a step runs.
    it = DevicePrefetch(loader)
    batch = next(it) if step0 < config.train.num_steps else None
    clock.mark("first batch")
    compiled = None
    if batch is not None:
        lowered = setup.jit_step().lower(state, frozen, batch)
        clock.mark("trace+lower")
        compiled = lowered.compile()
        clock.mark("compile")
    exemplar = ExemplarEval(config) if config.exemplar_eval.num_triplets else None
    # ---- loop
    pre = Preemption(every=config.log_every_steps)
    flops = peak = 0.0
    last = {}
    step = step0
    t_last, n_last, wait_last = time.perf_counter(), step0, it.wait_seconds()
    startup = {}
    skips0 = int(jax.device_get(state["nan_skips"]))  # a run that skips every step fails below
    goodput = Goodput()
    try:
        while step < config.train.num_steps:
            state, m = compiled(state, frozen, batch)
            if step == step0:  # the first step, to its end, closes the start-up report
                jax.block_until_ready(m)
                clock.mark("first step")
                log.info("%s", clock.line())
                startup = clock.as_dict()  # goes into the first metrics row
                goodput.add_startup(startup)
                goodput.loop_started(it.wait_seconds())
                # What only the logs need waits until the first step has run (and is not
                # counted in the first logged step time).
                t_extra = time.perf_counter()
                flops = step_flops(compiled)
                peak = peak_flops_per_device(config.peak_flops)
                log.info("train step: %.3g FLOPs/step/device; peak %.3g FLOP/s/device", flops, peak)
                if step0 == 0:
                    writer.image(0, "train_inputs", _input_grid(batch))
                t_last += time.perf_counter() - t_extra
            step += 1
            watchdog.progress(step)
            stop_nan = config.train.nan_policy == "stop" and not bool(m["update_ok"])
            if stop_nan:
                raise FloatingPointError(f"non-finite loss/grad at step {step}: stopping "
                                         f"(nan_policy='stop'); the last good checkpoint is intact")
            is_last = step == config.train.num_steps
            if step % config.log_every_steps == 0 or is_last:
                m = jax.device_get(m)
                now = time.perf_counter()
                dt = (now - t_last) / max(step - n_last, 1)
                # share of the time since the last log spent waiting for input (0: never stalled)
                data_wait = (it.wait_seconds() - wait_last) / max(now - t_last, 1e-9)
                t_last, n_last, wait_last = now, step, it.wait_seconds()
                ips = config.train.batch_size / dt
                mfu = flops / dt / peak if flops and peak else 0.0
                last = {**{k: float(v) for k, v in m.items()}, "step_time": dt, "images_per_s": ips,
                        "mfu": mfu, "data_wait": data_wait, **startup}
                startup = {}
                last.update({f"data/{k}": v for k, v in it.bad_data_counts().items()})
                writer.scalars(step, last)
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g %.2f img/s %.3fs/step MFU %.2f%% skips %d",
                         step, config.train.num_steps, last["loss"], last["lr"], last["grad_norm"], ips,
                         dt, 100 * mfu, int(last["nan_skips"]))
            t_ckpt = time.perf_counter()
            ckpt.check()  # a failed background save stops the run now, not at the next save
            preempted = pre.should_stop(step)
            if step % config.ckpt_every_steps == 0 or is_last or preempted:
                ckpt.save(step, state, None if lora else frozen, it.get_state(), json.loads(config.to_json()),
                          wait=preempted or is_last)
            goodput.since("checkpoint", t_ckpt)
            if preempted:
                log.warning("checkpoint at step %d written; exiting on SIGTERM", step)
                break
            t_evals = time.perf_counter()
            if config.sample_every_steps and step % config.sample_every_steps == 0:
                _log_samples(setup, state, frozen, batch, writer, step)
            if exemplar is not None and (is_last or (config.sample_every_steps
                                                     and step % config.sample_every_steps == 0)):
                last.update(_exemplar_eval(exemplar, setup, state, frozen, writer, step))
            if config.evals.every_steps and step % config.evals.every_steps == 0:
                _run_evals(setup, state, frozen, writer, step)
            goodput.since("evals", t_evals)
            if not is_last:
                batch = next(it)
        _report_goodput(goodput, workdir, writer, step, it.wait_seconds())
    except Exception:
        watchdog.on_error()  # a collective failed because a peer is gone: say so
        raise
    finally:
        pre.restore()
        ckpt.close()
        writer.close()
        it.close()  # stops the prefetch thread, then grain worker processes / threads
    watchdog.stop()
    if step > step0:
        guards.check_some_step_applied(config, step0, step, skips0, int(jax.device_get(m["nan_skips"])))
    shown = [k for k in ("loss", *sorted(k for k in last if k.startswith("eval/"))) if k in last]
    if shown:  # the final console line: the loss and the held-out scores
        log.info("done: step %d %s", step, ", ".join(f"{k} {last[k]:.4g}" for k in shown))
    return last


def _report_goodput(goodput: Goodput, workdir: str, writer: MetricWriter, step: int,
                    data_wait_s: float) -> None:
    """The run's goodput: TensorBoard, WORKDIR/goodput.json (process 0) and one log line."""
    values, line = goodput.report(workdir, data_wait_s)
    writer.tensorboard_scalars(step, values)
    if writer.enabled:
        atomic_write(epath.Path(workdir) / "goodput.json", json.dumps({"step": step, **values}, indent=1))
    log.info("%s", line)


def _log_samples(setup: Setup, state, frozen, batch, writer: MetricWriter, step: int) -> None:
    """A grid of sampler outputs on the current batch's first images (process 0 writes)."""
    model = setup.model(state["params"], frozen)
    grid = training_samples(model, batch, setup.config)
    if grid is not None:
        writer.image(step, "samples", grid)


def _exemplar_eval(exemplar: ExemplarEval, setup: Setup, state, frozen, writer: MetricWriter,
                   step: int) -> dict:
    """Held-out exemplar-following scores and grid (`pbe_jax.evaluation.exemplar`) of the EMA params
    when the run keeps them (`config.train.ema_decay`), else of the params."""
    values, grid = exemplar(setup.model(state.get("ema", state["params"]), frozen))
    writer.scalars(step, values)
    writer.image(step, "exemplar", grid)
    log.info("step %d %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return values


def _run_evals(setup: Setup, state, frozen, writer: MetricWriter, step: int) -> None:
    """COCOEE metrics of the current params (`config.evals`), on every process."""
    model = setup.model(state["params"], frozen)
    values = training_eval(model, setup.config, step)
    if values:
        writer.scalars(step, values)
        log.info("step %d evals: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
