"""`fdbp-train`: the command line of `train_and_evaluate`. Flags come from the `Config` fields; bad
input is one line naming its flag (exit code 2), divergence exit code 3, a lost process exit code 4, a
signal exit code 130 (README: "Exit codes")."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from typing import NoReturn, Sequence

import jax

from fdbp_jax import data as data_lib
from fdbp_jax import distributed, host_memory
from fdbp_jax.config import PRESETS, Config, validate
from fdbp_jax.train import Diverged, LostProcess, model_split, train_and_evaluate

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_LOST_PROCESS, EXIT_INTERRUPTED = 2, 3, 4, 130


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (unparsable values, unknown flags) become the CLI's one-line bad input."""

    def error(self, message: str):
        raise ValueError(message)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers such as 10,19,28") from None


FIELD_TYPES = {"int": int, "int | None": int, "float": float, "str": str, "tuple": int_list, "tuple | None": int_list}


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field (type, default and help from its declaration), then the flags of
    the command itself. Flags left out keep the preset's or Config's default."""
    p = _Parser(prog="fdbp-train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset; other flags override it")
    for field in dataclasses.fields(Config):
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        help_text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %
        text = f"{help_text} (default: {field.default})"
        if field.type == "bool":
            action = "store_false" if field.default else "store_true"
            p.add_argument(flag, dest=field.name, action=action, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=field.name, type=FIELD_TYPES[field.type], metavar=field.name.upper(), help=text)
    add = p.add_argument
    add("--coordinator-address", help="multi-host: host:port of process 0 (else from the cluster's environment)")
    add("--num-processes", type=int, help="multi-host: number of processes")
    add("--process-id", type=int, help="multi-host: this process's index")
    add("--collective-timeout", type=int, default=60, metavar="SECONDS",
        help="multi-process on CPU (gloo): a collective waiting longer on a peer fails, ending the run with exit "
             "code 4 (a dead peer can leave a send waiting); raise it if processes may fall this far behind")
    add("--workdir", default="runs/latest")
    add("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    add("--overwrite", action="store_true", help="replace a run already in --workdir")
    add("--show-split", action="store_true", help="print the stage split and exit")
    add("--system-malloc", action="store_true",
        help="keep glibc malloc's defaults (by default a process with one CPU device keeps the memory it frees, "
             "which spares XLA:CPU a page fault per fresh page each step, host memory peaking a little higher; "
             "one with several CPU devices restarts itself with malloc on transparent huge pages kept in its arenas, "
             "and XLA:CPU scheduling for memory: fdbp_jax.host_memory.mesh_environment)")
    add("--no-progress", action="store_true")
    add("--debug", action="store_true", help="show tracebacks")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    values = dict(PRESETS.get(args.preset, {}))
    for field in dataclasses.fields(Config):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return Config(**values)


def simulate_devices(count: int) -> None:
    """Ask JAX for `count` CPU devices; it must run before any JAX computation starts the backend."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass  # backend already running: make_mesh reports a shortage


def check_processes(args: argparse.Namespace, config: Config) -> int:
    """The number of processes, after checking the multi-host flags against it and each other."""
    processes = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if processes < 1:
        raise ValueError(f"--num-processes {processes}: must be >= 1")
    if args.process_id is not None and not 0 <= args.process_id < processes:
        raise ValueError(f"--process-id {args.process_id}: must be between 0 and --num-processes - 1 = {processes - 1}")
    if args.collective_timeout < 1:
        raise ValueError(f"--collective-timeout {args.collective_timeout}: must be >= 1 (seconds)")
    if processes > 1 and config.emulate:
        raise ValueError(f"--emulate runs on one device of one process: drop it or --num-processes {processes}")
    return processes


def abandon_run(err: LostProcess, debug: bool) -> NoReturn:
    """Leave a run whose peer is gone: one line (the traceback with --debug), then exit at once with
    EXIT_LOST_PROCESS. A normal exit would wait in JAX's shutdown barrier for the dead peer until the
    runtime aborts the process (minutes, then a C++ stack trace)."""
    if debug:
        traceback.print_exc()
    print(f"fdbp-train: error: [process {jax.process_index()}] {err}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_LOST_PROCESS)


def main(argv: Sequence[str] | None = None) -> int:
    """`fdbp-train` on `argv` (default: the command line); the exit code. As the program (argv None) it
    also sets this process's malloc up before JAX starts (`host_memory`, unless --system-malloc)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        config = config_from_args(args)
        validate(config)
        devices = 1 if config.emulate else max(1, config.stages) * max(1, config.data_parallel)
        processes = check_processes(args, config)
        devices_per_process = max(1, devices // processes)
        # as a program only (argv from the command line): a caller's process may have started JAX already
        if argv is None and not args.system_malloc:
            if host_memory.keeps_freed_memory_by_default(devices_per_process):
                host_memory.keep_freed_memory()
            elif host_memory.uses_mesh_environment_by_default(devices_per_process):
                host_memory.restart_with_mesh_environment()
        simulate_devices(devices_per_process)
        if args.coordinator_address or processes > 1:
            distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                   args.collective_timeout)
            distributed.check_same_settings({"config": config.to_json(), "workdir": os.path.abspath(args.workdir),
                                             "resume": args.resume, "overwrite": args.overwrite})
        if jax.default_backend() == "cpu" and devices > 1 and not args.show_split:
            print(f"fdbp-train: no accelerator, simulating {devices} CPU devices (data={config.data_parallel} x "
                  f"stage={config.stages}) on {os.cpu_count()} cores", flush=True)
        if args.show_split:
            print(model_split(config))
            return 0
        summary = train_and_evaluate(
            config, args.workdir, args.resume, args.overwrite, show_progress=not args.no_progress
        ).summary
    except (ValueError, data_lib.DatasetUnavailable) as err:
        if debug:
            raise
        print(f"fdbp-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as err:
        if debug:
            raise
        print(f"fdbp-train: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except LostProcess as err:
        abandon_run(err, debug)
    if summary["interrupted_at"] is not None:
        again = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--resume", "--overwrite"))
        print(f"fdbp-train: stopped by signal at epoch {summary['interrupted_at']['epoch'] + 1}, tick "
              f"{summary['interrupted_at']['index']} of the epoch; checkpoint written. Continue with: "
              f"fdbp-train {again} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps({k: summary[k] for k in ("test_accuracy", "best_test_accuracy", "final_train_loss",
                                              "wall_time_s", "images_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
