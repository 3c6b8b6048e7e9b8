"""`rise sweep CONFIG --grid key=v1,v2 ...`: a grid of RISE runs on Ray Tune, and one table of them.

Steps:
  1. every point of the grid (the product of the --grid keys' values) is a trial; each config is
     validated before anything starts, so a bad key or value is an error naming it;
  2. Ray Tune runs the trials (`Tuner` over `tune.grid_search`), as many at once as the cluster
     has room for (its CPUs and GPUs over one run's peak need; one at a time on a laptop), or
     `--max-concurrent`;
  3. a trial is `rise run` in a process of its own, joined to this Ray cluster, writing the run
     directory SWEEP_DIR/trials/NAME (its report.html included). It is a process, not a call in
     the trial's actor, because Tune places a trial's child tasks in the trial's placement group:
     the run's engines and trainers then could not get the resources they ask for;
  4. the table: every trial's base (iteration 0) and last iteration, the four metrics, the
     per-turn-pair flips wrong->right and right->wrong (counted over the pairs that could flip, as
     SCoRe reports them) and the copying rate (later turns that repeat the previous reply
     verbatim), printed and written to SWEEP_DIR/sweep.json and SWEEP_DIR/sweep.html.

Resuming: run the same command again. Tune restores the experiment (finished trials are not
rerun; errored or unfinished ones start again), and each trial's `rise run` resumes its run
directory at its first unfinished stage. A different grid, config or overrides in the same
SWEEP_DIR is an error.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

from rise_ray.config import DEFAULT_CONFIG, ConfigError, RunConfig, load_config
from rise_ray.preflight import check_run

METRICS = ("m1@t1", "mP@t1", "m1@tT", "p1@tT")  # P parallel samples, T turns: the eval's settings
TRIAL_CPU = 0.01  # the trial's own actor only waits on its `rise run` process


class SweepError(RuntimeError):
    """Trials that ended without results; the message names them and their logs."""


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """["data.tau=0.2,0.4", "rollout.best_of_n=4,8"] -> {key: [values]} (values as override text)."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {spec!r}: expected key=v1,v2,...")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        grid[key.strip()] = [v.strip() for v in values.split(",")]
        if any(not v for v in grid[key.strip()]):
            raise ConfigError(f"--grid {spec!r}: an empty value")
    if not grid:
        raise ConfigError("rise sweep needs at least one --grid key=v1,v2,...")
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def trial_name(i: int, point: dict[str, str]) -> str:
    slug = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
    return f"trial{i:02d}_" + re.sub(r"[^A-Za-z0-9_.=-]+", "-", slug)[:80]


def run_needs(cfg: RunConfig) -> dict[str, float]:
    """The most CPUs and GPUs a run holds at once: its warm-up trainer (no engines yet), or its
    engines (kept alive) with its trainer."""
    from rise_ray.demo.warmup import warmup_train_config
    from rise_ray.manifest import warmup_enabled

    r, t = cfg.rollout, cfg.train
    engines = {"CPU": r.num_engines * r.num_cpus_per_engine, "GPU": r.num_engines * r.num_gpus_per_engine}
    trainer = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": t.num_workers * float(t.use_gpu)}
    if r.colocate_with_trainer:
        trainer["GPU"] = 0.0  # the engines lend their GPUs to the trainer
    need = {k: engines[k] + trainer[k] for k in engines}
    if warmup_enabled(cfg):
        w = warmup_train_config(cfg)
        need["CPU"] = max(need["CPU"], w.num_workers * w.cpus_per_worker)
    return need


def default_concurrency(needs: list[dict[str, float]], cluster: dict[str, float]) -> int:
    """Trials that fit the cluster side by side (at least one)."""
    fits = [math.floor(cluster.get(k, 0.0) / n[k] + 1e-9) for n in needs for k in ("CPU", "GPU") if n[k] > 0]
    return max(1, min(fits, default=1))


def _trial(config: dict[str, Any]) -> None:
    """A Tune trainable: one `rise run` joined to this cluster; reports its last iteration."""
    import ray
    from ray import tune

    params = config["trial"]

    run_dir = os.path.join(params["trials_dir"], params["name"])
    cmd = [sys.executable, "-m", "rise_ray.cli", "run", *([params["config"]] if params["config"] else []),
           *params["overrides"], f"name={params['name']}", f"run_dir={params['trials_dir']}"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log_path = os.path.join(params["trials_dir"], params["name"] + ".log")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"trial {params['name']}: rise run exited {rc}; log {log_path}:\n{tail}")
    row = trial_row(run_dir)
    tune.report({f"last/{k}": v for k, v in row["last"].items() if isinstance(v, (int, float))})


def _tune_trial_name(trial) -> str:
    """Tune's name and directory for a trial: ours (its default spells out every parameter)."""
    return trial.config["trial"]["name"]


def turn_pairs(trajs: list) -> dict[str, float | int]:
    """Over every later turn and the turn before it: wrong->right among the pairs starting wrong,
    right->wrong among those starting right, replies repeating the previous one verbatim, and
    answers repeating the previous answer."""
    out = dict.fromkeys(("pairs", "wrong_pairs", "right_pairs", "wrong_to_right", "right_to_wrong", "copies",
                         "same_answer"), 0)  # fmt: skip
    for tr in trajs:
        for prev, cur in itertools.pairwise(tr.turns):
            out["pairs"] += 1
            out["copies"] += cur.response.strip() == prev.response.strip()
            out["same_answer"] += cur.answer is not None and cur.answer == prev.answer
            if prev.correct:
                out["right_pairs"] += 1
                out["right_to_wrong"] += not cur.correct
            else:
                out["wrong_pairs"] += 1
                out["wrong_to_right"] += bool(cur.correct)
    n = max(out["pairs"], 1)
    out["copy_rate"] = out["copies"] / n
    out["same_answer_rate"] = out["same_answer"] / n
    return out


def eval_records(run_dir: str, iteration: int) -> str | None:
    path = os.path.join(run_dir, f"iter_{iteration}", "eval", "records.parquet")
    return path if os.path.exists(path) else None


def trial_row(run_dir: str) -> dict[str, Any]:
    """The base and last iteration of a finished run directory: its metrics, flips and copying."""
    from rise_ray.data.store import read_trajectories

    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    iters = metrics["iterations"]
    out: dict[str, Any] = {"run_dir": run_dir, "wall_s": metrics.get("wall_s")}
    for label, it in (("base", iters[0]), ("last", iters[-1])):
        p, t = it.get("parallel", 5), it.get("turns", 5)
        names = ("m1@t1", f"m{p}@t1", f"m1@t{t}", f"p1@t{t}")
        row = {"iteration": it["iteration"], **{m: it.get(m) for m in names},
               **{m: it.get(n) for m, n in zip(METRICS, names, strict=True)}, "acc_by_turn": it.get("acc_by_turn")}  # fmt: skip
        if (records := eval_records(run_dir, it["iteration"])) is not None:
            row.update(turn_pairs(read_trajectories(records)))
        out[label] = row
    return out


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _flips(r: dict[str, Any]) -> str:
    if "pairs" not in r:
        return "-"
    return f"{r['wrong_to_right']}/{r['wrong_pairs']} {r['right_to_wrong']}/{r['right_pairs']} {_pct(r['copy_rate'])}"


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    head = [*keys, "iter", *METRICS, "w->r r->w copy%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for label in ("base", "last"):
            r = row.get(label)
            if r is None:
                lines.append("| " + " | ".join([*(row["point"][k] for k in keys), "failed", *["-"] * 5]) + " |")
                break
            cells = [*(row["point"][k] for k in keys), str(r["iteration"]), *(_pct(r[m]) for m in METRICS), _flips(r)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_html(rows: list[dict[str, Any]], keys: list[str], path: str, title: str) -> None:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   [*keys, "trial", "iter", *METRICS, "wrong→right", "right→wrong", "copies"])  # fmt: skip
    body = []
    for row in rows:
        link = os.path.relpath(os.path.join(row["run_dir"], "report.html"), os.path.dirname(path))
        name = f'<a href="{html.escape(link)}">{html.escape(row["name"])}</a>'
        for label in ("base", "last"):
            r = row.get(label)
            cells = [html.escape(row["point"][k]) for k in keys] + [name]
            if r is None:
                cells += ["failed"] + [""] * 7
            else:
                pairs = "pairs" in r
                cells += [str(r["iteration"]), *(_pct(r[m]) for m in METRICS),
                          f"{r['wrong_to_right']}/{r['wrong_pairs']}" if pairs else "-",
                          f"{r['right_to_wrong']}/{r['right_pairs']}" if pairs else "-",
                          f"{_pct(r['copy_rate'])}%" if pairs else "-"]  # fmt: skip
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            if r is None:
                break
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>Percent of the evaluated problems; iteration 0 is the base. "
            "Flips count later-turn pairs: wrong→right among pairs whose first turn is wrong, right→wrong among "
            "those whose first turn is right; copies: later turns repeating the previous reply verbatim.</p>"
            f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>")  # fmt: skip
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def sweep(config: str | None, grid: dict[str, list[str]], overrides: list[str], sweep_dir: str,
          max_concurrent: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Run (or resume) the grid in sweep_dir; returns one row per trial."""
    sweep_dir = os.path.abspath(sweep_dir)
    points = grid_points(grid)
    names = [trial_name(i, p) for i, p in enumerate(points)]
    cfgs = []
    for name, point in zip(names, points, strict=True):
        try:
            cfgs.append(load_config(config or DEFAULT_CONFIG, [*overrides, *(f"{k}={v}" for k, v in point.items())]))
            check_run(cfgs[-1])  # what each trial's `rise run` would refuse, refused before Tune starts
        except ConfigError as e:
            raise ConfigError(f"sweep trial {name}: {e}") from None
    spec = {"config": os.path.abspath(config) if config else None, "grid": grid, "overrides": overrides}
    os.makedirs(os.path.join(sweep_dir, "trials"), exist_ok=True)
    spec_path = os.path.join(sweep_dir, "sweep_spec.json")
    if os.path.exists(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            old = json.load(f)
        if old != spec:
            raise ConfigError(f"{sweep_dir} holds another sweep ({old}); give another --sweep-dir")
    else:
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=2)

    import ray
    from ray import tune

    from rise_ray.session import init_ray

    init_ray()
    n = max_concurrent or default_concurrency([run_needs(c) for c in cfgs], ray.cluster_resources())
    trials_dir = os.path.join(sweep_dir, "trials")
    params = [{"name": nm, "point": p, "config": spec["config"], "trials_dir": trials_dir,
               "overrides": [*overrides, *(f"{k}={v}" for k, v in p.items())]}
              for nm, p in zip(names, points, strict=True)]  # fmt: skip
    trainable = tune.with_resources(_trial, {"cpu": TRIAL_CPU})
    tune_path = os.path.join(sweep_dir, "tune")
    print(f"[rise sweep] {len(points)} trial(s), up to {n} at once; runs in {trials_dir}", flush=True)
    if tune.Tuner.can_restore(tune_path):
        tuner = tune.Tuner.restore(tune_path, trainable, restart_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(params)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=n, trial_name_creator=_tune_trial_name,
                                                       trial_dirname_creator=_tune_trial_name),
                           run_config=tune.RunConfig(name="tune", storage_path=sweep_dir, verbose=1))  # fmt: skip
    tuner.fit()

    rows = []
    for nm, p in zip(names, points, strict=True):
        run_dir = os.path.join(trials_dir, nm)
        row: dict[str, Any] = {"name": nm, "point": p, "run_dir": run_dir}
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            row.update(trial_row(run_dir))
        rows.append(row)
    keys = list(grid)
    print(table(rows, keys), flush=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({**spec, "trials": rows}, f, indent=2)
    write_html(rows, keys, os.path.join(sweep_dir, "sweep.html"), f"rise sweep: {config or 'embedded default'}")
    print(f"wrote {sweep_dir}/sweep.json, sweep.html", flush=True)
    failed = [r["name"] for r in rows if "last" not in r]
    if failed:
        raise SweepError(f"trial(s) without results: {failed} (logs in {trials_dir}/NAME.log)")
    return rows
