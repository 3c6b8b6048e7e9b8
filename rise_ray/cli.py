"""`rise` command line: run | eval | train | serve | report.

Every command takes an optional CONFIG (YAML) and `key=value` dotted overrides, torchtune style:
    rise eval configs/gsm8k.yaml model.path=/models/my-ckpt eval.turns=3
"""

from __future__ import annotations

import argparse
import os
import sys

from rise_ray.config import ConfigError, RunConfig, load_config


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """The config path (first argument without '=') and the overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config(args: list[str]) -> RunConfig:
    path, overrides = _split(args)
    return load_config(path, overrides)


def cmd_eval(ns: argparse.Namespace) -> int:
    """Evaluate a model: no-oracle multi-turn episodes on the test problems."""
    from rise_ray.eval.evaluate import evaluate
    from rise_ray.session import env_options, init_ray, make_env, make_pool, resolve_model

    cfg = _config(ns.args)
    out_dir = ns.out or os.path.join(cfg.run_dir, cfg.name, "eval")
    os.makedirs(out_dir, exist_ok=True)
    env = make_env(cfg.env)
    if not env.test:
        raise ConfigError(f"env '{cfg.env.name}' has no test problems: set env.test_path")
    init_ray()
    model_path = resolve_model(cfg.model, os.path.join(cfg.run_dir, cfg.name))
    pool = make_pool(cfg.rollout, cfg.model, model_path, cfg.seed)
    evaluate(pool, env, env_options(cfg.env, with_data=False), env.test, cfg.eval, out_dir)
    print(f"wrote {out_dir}/metrics.json, records.parquet, turns.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="evaluate a model (m1@t1, m5@t1, m1@t5, p1@t5, accuracy per turn)")
    p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]")
    p.add_argument("--out", help="output directory (default: RUN_DIR/NAME/eval)")
    p.set_defaults(fn=cmd_eval)
    ns = parser.parse_args(argv)
    try:
        return ns.fn(ns)
    except ConfigError as e:
        print(f"rise: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
