"""Progress of long rollouts: the tally the episode loop keeps, the reporter's numbers and cadence,
the training line's ETA, and progress arriving from the engine actors during a real pool run."""

from __future__ import annotations

import io
import re

import pytest
from test_episodes import ENV, P, ScriptedEngine, box

from rise_ray import progress
from rise_ray.progress import EpisodeTally, ProgressBoard, Reporter, fmt_duration, merge
from rise_ray.rollout.engine import Completion, SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, run_episodes, samples_per_episode


def ids(text: str, n: int) -> Completion:
    return Completion(text, token_ids=range(n))


# -- the tally the episode loop keeps ----------------------------------------------------------------


class Watching(ScriptedEngine):
    """Records the tally's snapshot at every engine call: what the driver would see meanwhile."""

    def __init__(self, script, tally):
        super().__init__(script)
        self.tally, self.during = tally, []

    def generate(self, convs, n, params):
        self.during.append(self.tally.snapshot())
        return super().generate(convs, n, params)


# q1 right at turn 2 (the oracle ends it there), q2 never; candidates carry 3 and 4 token ids.
SCRIPT = {
    "q1": [[ids(box(1), 3), ids(box(2), 3)], [ids(box(5), 4)], [ids(box(5), 4)]],
    "q2": [[ids(box(1), 3), ids(box(2), 3)], [ids(box(4), 4)], [ids(box(4), 4)]],
}


@pytest.mark.parametrize("schedule", ["waves", "async"])
def test_the_tally_counts_turns_samples_tokens_and_work_with_early_stops(schedule):
    tally = EpisodeTally()
    engine = Watching(SCRIPT, tally)
    spec = EpisodeSpec(turns=3, params=SamplingParams(max_tokens=5), first_n=2, oracle=True, schedule=schedule)
    trajs = run_episodes(engine, ENV, P, spec, progress=tally)
    assert [len(t.turns) for t in trajs] == [2, 3]
    end = tally.snapshot()
    assert end["finished"] == 2 and end["turns"] == {}
    assert end["samples"] == 2 + 1 + 2 + 1 + 1  # q1: 2 + 1; q2: 2 + 1 + 1
    assert end["tokens"] == 2 * (3 + 3) + 3 * 4
    # q1 skipped its third turn (1 sample): counted as done, so the work is complete
    assert end["work"] == 2 * samples_per_episode(spec) == 8
    if schedule == "waves":  # each wave is seen before its call: the turn, and what came back so far
        assert [d["turns"] for d in engine.during] == [{1: 2}, {2: 2}, {3: 1}]
        assert [d["samples"] for d in engine.during] == [0, 4, 6]
        assert [d["finished"] for d in engine.during] == [0, 0, 1]
    else:  # one episode per call: the other waits on its own turn meanwhile
        assert all(sum(d["turns"].values()) >= 1 for d in engine.during)


def test_the_tally_sends_changed_snapshots_and_the_last_on_exit():
    sent = []
    with EpisodeTally(send=sent.append, every_s=3600) as tally:  # the thread never fires here
        tally.asks(0, 1)
        tally.flush()
        tally.flush()  # nothing changed: nothing sent
        tally.answered(0, [ids("a", 2)])
        tally.made(2)
        tally.ended(0)
    assert [s["samples"] for s in sent] == [0, 1]  # one send for the three changes
    assert sent[-1] == {"finished": 1, "samples": 1, "tokens": 2, "work": 1, "turns": {}}


def test_a_failing_send_never_fails_the_run():
    def broken(snapshot):
        raise ConnectionError("board gone")

    with EpisodeTally(send=broken, every_s=0.01) as tally:
        trajs = run_episodes(ScriptedEngine(SCRIPT), ENV, P, EpisodeSpec(turns=2, first_n=2), progress=tally)
    assert len(trajs) == 2 and tally.snapshot()["finished"] == 2


def test_the_board_sums_sources_keeps_the_latest_and_drops_ended_runs():
    board = ProgressBoard()
    board.report("r1", 0, {"finished": 1, "samples": 4, "tokens": 40, "work": 4, "turns": {2: 3}})
    board.report("r1", 0, {"finished": 2, "samples": 6, "tokens": 60, "work": 7, "turns": {3: 1}})  # replaces
    board.report("r1", 1, {"finished": 0, "samples": 2, "tokens": 10, "work": 2, "turns": {1: 4, 3: 1}})
    board.report("r2", 0, {"finished": 9, "samples": 9, "tokens": 9, "work": 9, "turns": {}})
    assert board.totals("r1") == {"finished": 2, "samples": 8, "tokens": 70, "work": 9, "turns": {1: 4, 3: 2}}
    board.end("r1")
    board.report("r1", 2, {"finished": 5, "samples": 5, "tokens": 5, "work": 5, "turns": {}})  # late: dropped
    assert board.totals("r1") == merge([]) and board.totals("r2")["finished"] == 9


def test_the_board_remembers_only_the_latest_ended_runs():
    """A pool's board lives as long as the pool: what it keeps of ended runs stays bounded, and
    the latest still drop their late reports."""
    board = ProgressBoard(ended_kept=3)
    for k in range(50):
        board.report(f"r{k}", 0, {"finished": 1, "samples": 1, "tokens": 1, "work": 1, "turns": {}})
        board.end(f"r{k}")
    assert list(board._ended) == ["r47", "r48", "r49"] and board._runs == {}
    board.report("r49", 1, {"finished": 5, "samples": 5, "tokens": 5, "work": 5, "turns": {}})  # late: dropped
    assert board.totals("r49") == merge([])
    assert ProgressBoard()._ended_kept == progress.ENDED_KEPT  # the default bound


# -- the reporter ------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Gauges:
    def __init__(self):
        self.seen = []

    def update(self, label, st):
        self.seen.append((label, st.finished, st.eta_s))


def reporter(totals, clock, tty=False, every_s=10.0, **kw):
    stream = io.StringIO()
    r = Reporter("eval", problems=10, turns=3, per_episode=4, poll=lambda: totals[0], stream=stream,
                 tty=tty, every_s=every_s, clock=clock, **kw)
    return r, stream


def test_reporter_numbers_from_known_updates():
    clock, totals = Clock(), [merge([])]
    r, _ = reporter(totals, clock)
    st = r.status(totals[0], clock.now)  # the pipeline starting: nothing under way
    assert st.fraction == 0 and st.eta_s is None and st.tokens_per_s == 0
    assert "| starting |" in r.line(st) and "ETA ?" in r.line(st)
    clock.now += 30  # start-up: not counted in the rates
    r.status(totals[0], clock.now)  # the last poll that saw nothing
    st = r.status({**merge([]), "turns": {1: 10}}, clock.now)
    assert r.began == clock.now and st.elapsed_s == 30 and st.eta_s is None and "turn 1/3 |" in r.line(st)
    # 20 s later: 4 problems done, 12 samples, work 25 of 10 x 4 = 40
    totals[0] = {"finished": 4, "samples": 12, "tokens": 3000, "work": 25, "turns": {2: 3, 3: 2}}
    clock.now += 20
    st = r.status(totals[0], clock.now)
    assert (st.finished, st.samples, st.problems) == (4, 12, 10)
    assert st.fraction == pytest.approx(25 / 40)
    assert st.tokens_per_s == pytest.approx(150.0)
    assert st.eta_s == pytest.approx(20 * (15 / 40) / (25 / 40))  # 12 s at the rate so far
    line = r.line(st)
    assert "turns 2:3 3:2 of 3" in line and "problems 4/10 done, 5 running" in line
    assert "| 12 samples | 3,000 tokens, 150 tok/s |" in line and "| 50s | ETA 12s" in line and " 62%" in line
    one = r.line(r.status({**totals[0], "turns": {2: 5}}, clock.now))
    assert "turn 2/3 |" in one
    assert "tok/s -" in r.line(r.status({**totals[0], "tokens": 0}, clock.now))  # engine without ids


def test_non_tty_prints_a_line_per_period_and_a_last_line():
    clock, totals = Clock(), [{**merge([]), "turns": {1: 10}}]
    gauges = Gauges()
    r, stream = reporter(totals, clock, metrics=gauges)
    r._due = clock.now + 10  # as start() does: the first line one period in
    printed = []
    for t in [0, 1, 5, 9.9, 10, 11, 19.9, 20.5, 25, 30.4, 31, 55, 59, 60.2]:
        clock.now = 100 + t
        totals[0] = {**totals[0], "samples": int(t)}
        if r.tick():
            printed.append(t)
    assert printed == [10, 20.5, 30.4, 55, 60.2]  # on the 10 s grid; a late poll prints at once, once
    assert len(gauges.seen) == 14  # the gauges follow every poll, not only the printed ones
    totals[0] = {"finished": 10, "samples": 40, "tokens": 4000, "work": 40, "turns": {}}
    clock.now = 180
    last = r.stop()
    assert last == "[rise eval] done: 10/10 problems, 40 samples, 4,000 tokens, 50 tok/s in 1m20s"
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 and lines[-1] == last and "\r" not in stream.getvalue()
    assert gauges.seen[-1] == ("eval", 10, 0.0)


def test_tty_redraws_one_line():
    clock, totals = Clock(), [{"finished": 1, "samples": 4, "tokens": 8, "work": 4, "turns": {1: 9}}]
    r, stream = reporter(totals, clock, tty=True, every_s=1.0, metrics=None)
    for t in (0, 1, 2):
        clock.now = 100 + t
        r.tick()
    r.stop()
    out = stream.getvalue()
    assert out.count("\r\x1b[2K") == 4 and out.count("\n") == 1 and out.endswith("\n")


def test_a_failing_poll_skips_the_tick():
    def poll():
        raise TimeoutError("board busy")

    r = Reporter("eval", 1, 1, 1, poll, stream=io.StringIO(), tty=False, metrics=None)
    assert r.tick() is None and r.stop() is None


def test_durations():
    assert [fmt_duration(s) for s in (None, 0, 59.4, 61, 3599, 3661)] == ["?", "0s", "59s", "1m01s", "59m59s", "1h01m"]


def test_training_line_carries_tokens_per_second_and_eta(capsys):
    from rise_ray.train.progress import StepPlan, log_step

    plan = StepPlan(rows_per_worker=80, micro_batches_per_epoch=10, steps_per_epoch=10, total_steps=10, warmup_steps=0)
    log_step(None, {"step": 4, "epoch": 1, "loss": 1.5, "lr": 1e-4, "tokens_per_s": 1234.0, "train_time_s": 80.0}, plan)
    line = capsys.readouterr().err
    assert "step 4/10 (40%)" in line and "1,234 tok/s" in line and "| 1m20s ETA 2m00s" in line


# -- a real pool: progress arrives from the actor while the run goes on ------------------------------


@pytest.mark.timeout(400)
@pytest.mark.parametrize("schedule", ["waves", "async"])  # async: the episodes run inside the engine actor
def test_progress_arrives_from_the_engine_actor_during_a_pool_run(ray_local, tiny_model_dir, monkeypatch, capfd, schedule):
    from rise_ray.envs import get_env
    from rise_ray.rollout.pool import RolloutPool

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.5)
    pool = RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=0.5)
    env = get_env("search", num_train=0, num_test=32)
    spec = EpisodeSpec(turns=3, params=SamplingParams(max_tokens=24, seed=0), first_n=2, schedule=schedule)
    capfd.readouterr()
    trajs = pool.run(env.name, {}, env.test, spec, batch_size=16, progress="eval")
    pool.shutdown()
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("[rise eval]")]
    assert len(trajs) == 32 and lines, err[-2000:]
    samples = sum(len(c) for t in trajs for c in (turn.candidates for turn in t.turns))
    assert lines[-1].startswith(f"[rise eval] done: 32/32 problems, {samples:,} samples, ")
    mid = [x for x in lines[:-1] if int(re.search(r"([\d,]+) samples", x).group(1).replace(",", "")) > 0]
    assert mid, f"no line showed samples before the end:\n{err[-3000:]}"  # sent from the actor / task mid-run
    assert any(re.search(r"\| turns? \d", x) for x in lines[:-1])  # the turn in progress
    assert "Running Dataset" not in err and "MapBatches(episode_batch)" not in err  # Ray Data's block is off


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tokens_move_the_line_during_a_long_first_turn(ray_local, tiny_model_dir, monkeypatch, capfd):
    """vLLM in an engine actor, one turn, one batch: no sample comes back before the end, yet the
    lines meanwhile show tokens/s (the actor reports its call's tokens to the board as it makes them)."""
    from rise_ray.envs import get_env
    from rise_ray.rollout.pool import RolloutPool

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.5)
    pool = RolloutPool("vllm", tiny_model_dir, num_engines=1, num_cpus=0.5, engine_kwargs={"max_model_len": 1024})
    env = get_env("search", num_train=0, num_test=16)
    spec = EpisodeSpec(turns=1, params=SamplingParams(max_tokens=800, seed=0), first_n=4)
    capfd.readouterr()
    trajs = pool.run(env.name, {}, env.test, spec, batch_size=16, progress="eval")
    pool.shutdown()
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("[rise eval]")]
    assert len(trajs) == 16 and lines[-1].startswith("[rise eval] done: 16/16 problems, 64 samples, "), err[-2000:]
    moving = [x for x in lines[:-1] if "| 0 samples |" in x and re.search(r"\| [1-9][\d,]* tokens, [\d,]+ tok/s \|", x)]
    assert moving, f"no line showed tokens before the first reply came back:\n{err[-3000:]}"

