"""report.html: a run directory built by hand, the page's content and escaping, and (slow) the page
rendered in headless Chromium: it loads without script errors and its filters show the right problems."""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rise_ray.data.store import write_trajectories
from rise_ray.eval.html_report import embed_json, flip_matrix
from rise_ray.eval.metrics import compute_metrics
from rise_ray.report import write_report
from rise_ray.rollout.episodes import Trajectory, Turn

# Model text that would break or inject into a page that pasted it in as markup.
EVIL = ('</script><script>document.title="pwned"</script><img src=x '
        "onerror=\"document.body.setAttribute('data-pwned','1')\"><!-- & \u2028")


def turn(correct: bool, answer: str = "7", source: str = "policy", cands: int = 1, text: str | None = None) -> Turn:
    reply = text if text is not None else f"I think it is \\boxed{{{answer}}}"
    return Turn(
        response=reply, answer=answer, reward=float(correct), correct=correct, source=source, finished=True,
        degenerate=False, candidates=[reply] * cands, candidate_answers=[answer] + ["3"] * (cands - 1),
        candidate_rewards=[float(correct)] + [0.0] * (cands - 1), candidate_correct=[correct] + [False] * (cands - 1),
    )


def traj(pid: str, pattern: str, question: str = "What is 3 + 4?", first_n: int = 4, text: str | None = None) -> Trajectory:
    """`pattern`: one letter per turn, R right, W wrong; turn 1 holds `first_n` parallel candidates."""
    turns = [turn(c == "R", "7" if c == "R" else "5", cands=first_n if i == 0 else 1, text=text)
             for i, c in enumerate(pattern)]
    return Trajectory(pid, question, "#### 7", turns)


# Evaluation, 3 turns: what each filter must show.
EVAL = [traj("p-fixed2", "WRR"), traj("p-fixed3", "WWR"), traj("p-broken2", "RWW"), traj("p-never", "WWW"),
        traj("p-always", "RRR"), traj("p-evil", "WRW", question=EVIL, text=EVIL)]
EXPECTED = {
    "all": {t.problem_id for t in EVAL},
    "fixed-2": {"p-fixed2", "p-evil"},
    "fixed-3": {"p-fixed3"},
    "broken-2": {"p-broken2"},
    "broken-3": {"p-evil"},
    "never": {"p-never"},
}


def collected() -> list[Trajectory]:
    return [
        Trajectory("c-self", "What is 2 + 5?", "#### 7", [turn(False, "5"), turn(True, "7", cands=4)]),
        Trajectory("c-teacher", "What is 1 + 6?", "#### 7", [turn(False, "4"), turn(True, "7", source="teacher")]),
        Trajectory("c-first", "What is 0 + 7?", "#### 7", [turn(True, "7")]),
    ]


def write_eval(run_dir: Path, k: int, trajs: list[Trajectory]) -> None:
    out = run_dir / f"iter_{k}" / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_trajectories(trajs, str(out / "records.parquet"))
    m = {"iteration": k, **compute_metrics(trajs, lambda a: a, turns=3, parallel=4), "split": "test"}
    (out / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "demo"
    write_eval(d, 0, [traj(t.problem_id, "WWW") for t in EVAL])
    write_eval(d, 1, EVAL)
    (d / "iter_1" / "trajectories").mkdir(parents=True)
    write_trajectories(collected(), str(d / "iter_1" / "trajectories" / "part-0.parquet"))
    write_report(str(d), wall_s=12.0)
    return d


def page_data(page: str) -> dict:
    """The page's index with each view's problems unpacked (base64, gzip, JSON), as its script does."""
    m = re.search(r'<script type="application/json" id="rise-data">(.*?)</script>', page, re.S)
    assert m, "no embedded data"
    data = json.loads(m.group(1))
    for v in data["views"]:
        packed = re.search(rf'<script type="application/gzip" id="rise-view-{v["id"]}">([A-Za-z0-9+/=]*)</script>', page)
        assert packed, v["id"]
        v["problems"] = json.loads(gzip.decompress(base64.b64decode(packed.group(1))))
        assert v["shown"] == len(v["problems"])
    return data


def test_page_holds_metrics_flips_and_every_trajectory(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "[report.html](report.html)" in (run_dir / "report.md").read_text()
    for text in ("Metrics per iteration", "m1@t1", "m4@t1", "p1@t3", "Accuracy by turn", "wrong → right",
                 "data:image/png;base64,"):
        assert text in page, text
    assert "http://" not in page and "https://" not in page  # nothing is fetched: it opens from disk
    data = page_data(page)
    views = {v["id"]: v for v in data["views"]}
    assert list(views) == ["eval-0", "eval-1", "collected-1"]
    ev = views["eval-1"]
    assert ev["turns"] == 3 and [p["id"] for p in ev["problems"]] == [t.problem_id for t in EVAL]
    fixed2 = ev["problems"][0]
    assert [t["c"] for t in fixed2["t"]] == [False, True, True]
    assert [t["a"] for t in fixed2["t"]] == ["5", "7", "7"] and fixed2["t"][1]["w"] == 1.0
    assert [k[0] for k in fixed2["t"][0]["k"]] == ["5", "3", "3", "3"]  # turn 1: the parallel answers
    assert "k" not in fixed2["t"][1]
    by = {p["id"]: [t["p"] for t in p["t"]] for p in views["collected-1"]["problems"]}
    assert by == {"c-self": ["policy", "best-of-4"], "c-teacher": ["policy", "teacher"], "c-first": ["policy"]}


def test_flip_matrix_counts_each_turn_pair() -> None:
    pairs = flip_matrix(EVAL, 3)
    # turn 1 → 2: fixed2 and evil fixed, broken2 broken, always kept, fixed3 and never stayed wrong
    assert pairs[0] == {"wr": 2, "rw": 1, "rr": 1, "ww": 2}
    assert pairs[1] == {"wr": 1, "rw": 1, "rr": 2, "ww": 2}  # 2 → 3: fixed3 fixed, evil broken


def test_model_text_cannot_end_the_data_or_become_markup(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    # The only </script> tags are the page's own (index, one per view, script); no injected tag or comment.
    views = page_data(page)["views"]
    assert page.count("</script>") == 2 + len(views) and "<img src=x" not in page and "<!-- &" not in page
    assert "pwned" not in page.split('id="rise-data">')[0]
    evil = next(p for p in page_data(page)["views"][1]["problems"] if p["id"] == "p-evil")
    assert evil["q"] == EVIL and evil["t"][0]["r"] == EVIL  # and it reads back exactly
    assert embed_json({"s": "</script>"}) == '{"s":"\\u003c/script\\u003e"}'


def test_run_name_and_protocol_are_escaped(tmp_path: Path) -> None:
    d = tmp_path / "<b>odd"
    write_eval(d, 0, EVAL[:2])
    write_report(str(d))
    page = (d / "report.html").read_text(encoding="utf-8")
    assert "&lt;b&gt;odd" in page and "<b>odd" not in page


def write_config(run_dir: Path, seed: int, **changes: object) -> None:
    import yaml

    cfg = {"name": run_dir.name, "run_dir": str(run_dir.parent), "seed": seed, "model": {"tiny": {"seed": seed}},
           "eval": {"seed": 1234 + seed, "turns": 3}, "train": {"lr": 0.001, "seed": seed}}
    for key, value in changes.items():
        section, field = key.split("__")
        cfg[section][field] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_mean_and_sd_over_sibling_seed_runs_of_the_same_config(tmp_path: Path) -> None:
    for s, trajs in ((0, EVAL), (1, [traj(t.problem_id, "RRR") for t in EVAL]), (2, EVAL)):
        d = tmp_path / f"exp-seed{s}"
        write_eval(d, 0, trajs)
        write_config(d, s, **({"train__lr": 0.5} if s == 2 else {}))  # seed 2: another learning rate
        write_report(str(d))  # its metrics.json
    write_report(str(tmp_path / "exp-seed1"))  # with every sibling in place
    page = (tmp_path / "exp-seed1" / "report.html").read_text(encoding="utf-8")
    assert "Mean ± sd over 2 seeds" in page and "Averaged: exp-seed0, exp-seed1" in page
    assert "Seed run not averaged: exp-seed2: its config differs in train.lr." in page
    # m1@t1: seed 0 has 2 of 6 right at turn 1, seed 1 all: mean 66.7, sample sd 47.1
    assert "66.7 ± 47.1" in page
    alone = tmp_path / "single"
    write_eval(alone, 0, EVAL)
    write_report(str(alone))
    assert "seeds" not in (alone / "report.html").read_text(encoding="utf-8")
    (tmp_path / "exp-seed0" / "config.yaml").unlink()  # a sibling without its config is not averaged
    write_report(str(tmp_path / "exp-seed1"))
    page = (tmp_path / "exp-seed1" / "report.html").read_text(encoding="utf-8")
    assert "Mean ± sd" not in page and "Seed run not averaged: exp-seed0: no config.yaml." in page


def test_an_unreadable_records_file_costs_the_browser_view_not_the_report(tmp_path: Path) -> None:
    d = tmp_path / "run"
    write_eval(d, 0, EVAL)
    (d / "iter_0" / "eval" / "records.parquet").write_bytes(b"not parquet")
    write_report(str(d))
    page = (d / "report.html").read_text(encoding="utf-8")
    assert "Not shown:" in page and "records.parquet" in page and page_data(page)["views"] == []


# --- the page in a browser ---------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, fragment: str, profile: Path, budget_ms: int = 3000) -> tuple[str, str]:
    """The DOM after the page's script ran (Chromium headless), and Chromium's log (console errors)."""
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", page.as_uri() + fragment]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, out.stderr


def shown(dom: str) -> set[str]:
    return set(re.findall(r'<article class="problem" data-problem-id="([^"]+)"', dom))


def script_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "rror" in line)
            or "Content Security Policy" in line]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_page_renders_in_chromium_and_filters_show_the_right_problems(run_dir: Path, tmp_path: Path) -> None:
    page = run_dir / "report.html"
    doms = {}
    for filt, ids in EXPECTED.items():
        dom, log = render(page, f"#view=eval-1&filter={filt}", tmp_path / "profile")
        assert 'data-ready="1"' in dom, f"the script did not finish ({filt}): {script_errors(log) or log[-2000:]}"
        assert script_errors(log) == [], filt
        assert shown(dom) == ids, filt
        doms[filt] = dom
    # broken-3 shows only the hostile problem: its text is on the page as text, none of it ran
    # (no attribute set, title unchanged) and none of it became an element.
    dom = doms["broken-3"]
    assert 'data-pwned="1"' not in dom and "<title>RISE run demo</title>" in dom
    assert "&lt;/script&gt;&lt;script&gt;document.title" in dom and '<img src="x"' not in dom
    dom, log = render(page, "#view=eval-1&filter=all&q=PWNED", tmp_path / "profile")  # search, any case
    assert shown(dom) == {"p-evil"} and script_errors(log) == []
    dom, log = render(page, "#view=collected-1&filter=by-teacher", tmp_path / "profile")
    assert shown(dom) == {"c-teacher"} and script_errors(log) == [] and ">teacher<" in dom
    dom, _ = render(page, "#view=collected-1&filter=fixed-2", tmp_path / "profile")
    assert shown(dom) == {"c-self", "c-teacher"} and ">best-of-4<" in dom


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_a_gsm8k_size_run_gives_a_page_under_25_mb_that_draws_its_first_view(tmp_path: Path) -> None:
    """bench/report_size.py's run: 1,319 problems, 5 turns, 5 parallel answers, iterations 0..4,
    GSM8K-length replies. The time to the first view is bench/report_size.py's to measure (no timed
    assertion here); this checks the size and that the page unpacks and draws the view."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from report_size import build_run

    run_dir = build_run(str(tmp_path / "gsm8k-size"))
    write_report(run_dir)
    page = Path(run_dir) / "report.html"
    assert page.stat().st_size < 25e6, page.stat().st_size
    dom, log = render(page, "", tmp_path / "profile", budget_ms=30000)
    assert 'data-ready="1"' in dom and script_errors(log) == [], script_errors(log) or log[-2000:]
    assert len(shown(dom)) == 50 and "data-first-draw-ms=" in dom  # the first page of the last evaluation
    assert "showing 1\u201350 of 1319 matching" in dom
