"""The measurements (P1-P6 and the list rps), each against real server processes of the
measured tree. Called by bench/run.py; every function returns plain numbers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import common
import httpx
from common import (
    OUT,
    PY,
    ROOT,
    SIM_INSPECT_TOKEN,
    CpuMark,
    LagMark,
    Proc,
    Server,
    env_for,
    lag_since,
    log,
    summary,
)
from profile_summary import summarise

STOPPED = 'data-status="stopped"'
SIM_KEY = "sim-bench-key"


class Clients:
    """A websocket load-generator process (bench/ws_clients.py). Start several, then `ready()`
    each: they connect at the same time."""

    def __init__(
        self,
        urls: list[str],
        cookies: list[str],
        n: int,
        *,
        concurrency: int = 50,
        deadline: float = 600,
    ) -> None:
        spec = json.dumps(
            {
                "urls": urls,
                "cookies": cookies,
                "n": n,
                "concurrency": concurrency,
                "deadline": deadline,
            }
        )
        self.proc = subprocess.Popen(
            [PY, str(ROOT / "bench" / "ws_clients.py"), spec],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.deadline = deadline
        self._ready: dict[str, Any] | None = None

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def ready(self) -> dict[str, Any]:
        if self._ready is None:
            self._ready = self.read(self.deadline + 180)
        return self._ready

    def read(self, timeout: float = 300) -> Any:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"websocket clients silent for {timeout} s") from None
        if not line:
            raise RuntimeError("websocket clients died")
        return json.loads(line)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("QUIT")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def connect_all(gens: list[Clients]) -> tuple[int, int, float]:
    """Wait for generators started together: (sockets open, failed, seconds for all)."""
    ready = [g.ready() for g in gens]
    return (
        sum(r["ready"] for r in ready),
        sum(r["failed"] for r in ready),
        max((r["seconds"] for r in ready), default=0.0),
    )


def watch(gens: list[Clients], seconds: float, marker: str, act: Callable[[], None]) -> Any:
    """Arm every generator on `marker`, act, and collect (latencies from the act in ms, lost)."""
    for g in gens:
        g.send(f"WATCH {seconds} {marker}")
    for g in gens:
        g.read()  # armed
    t0 = time.time()
    act()
    lat: list[float] = []
    lost = 0
    for g in gens:
        got = g.read(seconds + 60)
        lat += [(t - t0) * 1000 for t in got["times"]]
        lost += got["sockets"] - len(got["times"])
    return lat, lost


def ws_url(server: Server, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def api(client: httpx.Client, method: str, url: str, token: str, **kw: Any) -> httpx.Response:
    return client.request(method, url, headers={"Authorization": f"Bearer {token}"}, **kw)


def launch(
    base: str,
    token: str,
    jobs: list[tuple[int, Callable[[], str]]],
    conc: int = 16,
) -> list[int]:
    """Launch runs through the API, `conc` at a time: (provider account, prompt maker) each;
    the prompt is made as its request is sent (P4 times each stream's start from it)."""

    async def go() -> list[int]:
        sem = asyncio.Semaphore(conc)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(account: int, prompt: Callable[[], str]) -> int:
                async with sem:
                    r = await client.post(
                        f"{base}/api/runs",
                        headers={"Authorization": f"Bearer {token}"},
                        json={"provider_account": account, "prompt": prompt()},
                    )
                    r.raise_for_status()
                    return int(r.json()["id"])

            return list(await asyncio.gather(*(one(a, p) for a, p in jobs)))

    return asyncio.run(go())


def fixed(account: int, prompts: list[str]) -> list[tuple[int, Callable[[], str]]]:
    def constant(prompt: str) -> Callable[[], str]:
        return lambda: prompt

    return [(account, constant(p)) for p in prompts]


def wait_for(
    client: httpx.Client,
    base: str,
    token: str,
    ids: list[int],
    pred: Any,
    timeout: float,
    poll: float = 1.0,
) -> dict[int, dict[str, Any]]:
    """Poll the API's list (200 runs a page, once a second: light next to what is measured)
    until pred(run_json) holds for every run (bounded)."""
    deadline = time.monotonic() + timeout
    wanted = set(ids)
    done: dict[int, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        cursor = None
        lowest = min(wanted)
        while True:
            params: dict[str, Any] = {"limit": 200}
            if cursor:
                params["cursor"] = cursor
            page = api(client, "GET", f"{base}/api/runs", token, params=params).json()
            for run in page["results"]:
                if run["id"] in wanted and run["id"] not in done and pred(run):
                    done[run["id"]] = run
            cursor = page["next_cursor"]
            if not cursor or not page["results"] or page["results"][-1]["id"] <= lowest:
                break
        if len(done) == len(wanted):
            return done
        time.sleep(poll)
    raise RuntimeError(f"{len(wanted) - len(done)} runs not ready in {timeout} s")


def sim_stop_times(sim: Server, provider: str) -> dict[str, float]:
    """When the simulator received each stop call (its request log), by provider run id."""
    log_ = httpx.get(
        f"{sim.url}/sim/requests?provider={provider}",
        headers={"X-Sim-Inspect-Token": SIM_INSPECT_TOKEN},
        timeout=30,
    ).json()
    out: dict[str, float] = {}
    for r in log_["requests"]:
        if r["method"] == "POST" and r["path"].endswith("/stop"):
            ext = r["path"].rstrip("/").split("/")[-2]
            out.setdefault(ext, datetime.fromisoformat(r["at"]).timestamp())
    return out


# --- P1 and P2: the stop path --------------------------------------------------------------


def p1_stop_overhead(web: Server, sim: Server, data: dict[str, Any], n: int) -> dict[str, Any]:
    token, fay = data["token"], data["accounts"]["fay"]
    tag = uuid.uuid4().hex[:6]
    prompts = [f"p1 {tag} {i} sim:pending=0 sim:duration=900" for i in range(n)]
    ids = launch(web.url, token, fixed(fay, prompts))
    with httpx.Client(timeout=30) as client:
        runs = wait_for(client, web.url, token, ids, lambda r: r["external_id"], 120)
        # Bare calls: the same stop endpoint of the same simulator, on runs made directly.
        sim_fay = f"{sim.url}/sim/fay/api/v1"
        key = {"Authorization": f"Bearer {SIM_KEY}", "Content-Type": "application/json"}
        bare_ids = []
        for i in range(n):
            r = client.post(
                f"{sim_fay}/conversations",
                headers=key,
                json={"prompt": f"bare {tag} {i} sim:pending=0 sim:duration=900"},
            )
            r.raise_for_status()
            bare_ids.append(r.json()["data"]["request_id"])
        time.sleep(0.5)
        sent_api: dict[str, float] = {}
        sent_bare: dict[str, float] = {}
        rtt_api, rtt_bare = [], []
        for pk, bare in zip(ids, bare_ids, strict=True):
            ext = runs[pk]["external_id"]
            t0 = time.time()
            api(client, "POST", f"{web.url}/api/runs/{pk}/stop", token, json={})
            rtt_api.append((time.time() - t0) * 1000)
            sent_api[ext] = t0
            t0 = time.time()
            client.post(f"{sim_fay}/conversation/{bare}/stop", headers=key, json={})
            rtt_bare.append((time.time() - t0) * 1000)
            sent_bare[bare] = t0
            time.sleep(0.02)
    got = sim_stop_times(sim, "fay")
    api_ms = [(got[e] - t) * 1000 for e, t in sent_api.items() if e in got]
    bare_ms = [(got[e] - t) * 1000 for e, t in sent_bare.items() if e in got]
    s_api, s_bare = summary(api_ms), summary(bare_ms)
    return {
        "api_to_sim": s_api,
        "bare_to_sim": s_bare,
        "ratio_p95": round(s_api["p95"] / s_bare["p95"], 2) if s_bare["p95"] else None,
        "api_roundtrip": summary(rtt_api),
        "bare_roundtrip": summary(rtt_bare),
    }


def p2_fanout(
    webs: list[Server], data: dict[str, Any], viewers: int, trials: int
) -> dict[str, Any]:
    token, fay, team = data["token"], data["accounts"]["fay"], data["team"]
    tag = uuid.uuid4().hex[:6]
    base = webs[0].url
    prompts = [f"p2 {tag} {i} sim:pending=0 sim:duration=900" for i in range(trials)]
    ids = launch(base, token, fixed(fay, prompts))
    with httpx.Client(timeout=30) as client:
        wait_for(client, base, token, ids, lambda r: r["external_id"], 120)
    # Every viewer watches the team's shared list (its newest page shows these runs), spread
    # over the web processes and over two load-generator processes.
    urls = [ws_url(w, f"/ws/teams/{team}/") for w in webs]
    gens = [Clients(urls, data["cookies"], viewers // 2) for _ in range(2)]
    lat: list[float] = []
    lost = 0
    try:
        connected, failed, connect_s = connect_all(gens)
        with httpx.Client(timeout=30) as client:
            for pk in ids:
                marker = f'id="run-row-{pk}"[^>]*data-status="stopped"'

                def stop(pk: int = pk) -> None:
                    api(client, "POST", f"{base}/api/runs/{pk}/stop", token, json={})

                got, missed = watch(gens, 10, marker, stop)
                lat += got
                lost += missed
                time.sleep(0.3)
    finally:
        for g in gens:
            g.close()
    return {
        "viewers": connected,
        "connect_failed": failed,
        "connect_seconds": connect_s,
        "latency": summary(lat),
        "lost": lost,
    }


# --- P3: idle sockets and a mass reconnect ------------------------------------------------------


def p3_capacity(
    web: Server,
    data: dict[str, Any],
    n: int,
    connect_box: float,
    reconnect_box: float,
) -> dict[str, Any]:
    """`n` idle viewers of run pages on one process (two generators, connecting for at most
    `connect_box` s); memory per socket from the process's RSS; then one generator's half
    drops and reconnects at once (timed, at most `reconnect_box` s); at the end their runs
    are stopped and every socket must see it (alive, and counted for P6)."""
    token, fay = data["token"], data["accounts"]["fay"]
    prompts = [f"p3 {i} sim:pending=0 sim:duration=900" for i in range(10)]
    ids = launch(web.url, token, fixed(fay, prompts))
    urls = [ws_url(web, f"/ws/runs/{pk}/") for pk in ids]
    warm = Clients(urls, data["cookies"], 20)
    gens: list[Clients] = []
    try:
        warm.ready()
        time.sleep(1)
        before = web.rss_kib()
        gens += [Clients(urls, data["cookies"], n // 2, deadline=connect_box) for _ in range(2)]
        connected, failed, connect_s = connect_all(gens)
        time.sleep(3)
        after = web.rss_kib()
        log(f"P3: {connected} sockets in {connect_s:.0f} s; reconnecting one half")
        gens[0].send(f"RECONNECT {reconnect_box} 500")
        reconnect = gens[0].read(reconnect_box + 120)
        with httpx.Client(timeout=30) as client:
            wait_for(client, web.url, token, ids, lambda r: r["external_id"], 60)

            def stop_all() -> None:
                for pk in ids:
                    api(client, "POST", f"{web.url}/api/runs/{pk}/stop", token, json={})

            lat, lost = watch(gens, 30, STOPPED, stop_all)
    finally:
        for g in [*gens, warm]:
            g.close()
    return {
        "asked": n,
        "sockets": connected,
        "connect_failed": failed,
        "connect_seconds": round(connect_s, 1),
        "connect_box_seconds": connect_box,
        "connect_per_second": round(connected / connect_s, 1) if connect_s else None,
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "kib_per_socket": round((after - before) / max(1, connected), 1),
        "reconnect": {**reconnect, "box_seconds": reconnect_box},
        "broadcast": summary(lat),
        "lost": lost,
    }


# --- P4: the watcher with many streaming runs ----------------------------------------------


class ChunkEnds:
    """The character count after each chunk of these prompts, from the measured tree's
    simulator (bench/chunks.py, started at once so it works while the streams run)."""

    def __init__(self, backend: str, prompts: list[str], chunks: int) -> None:
        self.prompts = prompts
        self.proc = subprocess.Popen(
            [PY, str(ROOT / "bench" / "chunks.py")],
            cwd=common.tree().root,
            env=env_for(backend),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.input = json.dumps([[p, chunks] for p in prompts])

    def result(self) -> list[list[int]]:
        out, err = self.proc.communicate(self.input, timeout=120)
        if self.proc.returncode:
            raise RuntimeError(f"chunks.py failed: {err[-2000:]}")
        return [list(c) for c in json.loads(out.strip().splitlines()[-1])]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


DELAY = re.compile(r"sim:delay=([\d.]+)")


class StreamPlan:
    """When a P4 size's streams start: every run is told (in its prompt) to wait until one
    common moment, plus a fixed phase within one chunk interval, so all `n` runs stream at
    once for the whole window (not a ramp as they are launched) and their chunks are spread
    evenly rather than in bursts. The time to launch them is estimated from the previous
    size's launch rate."""

    def __init__(self, duration: float, chunks: int) -> None:
        self.duration = duration
        self.chunks = chunks
        # Runs launched and viewers connected per second: a cautious first guess (a busy
        # 2-core machine launched 11/s), then measured at each size.
        self.launch_rate = 10.0
        self.viewer_rate = 10.0
        self.start_at = 0.0
        self.late = 0
        self.made: dict[int, str] = {}

    def begin(self, n: int, watched: int) -> float:
        # The viewers connect while the rest is launched: the longer of the two, plus room.
        lead = max(5.0, max(n / self.launch_rate, watched / self.viewer_rate) * 1.3 + 2)
        self.start_at = time.time() + lead
        self.late = 0
        return lead

    def prompt(self, tag: str, name: str, index: int) -> Callable[[], str]:
        interval = self.duration / self.chunks
        phase = (index * 0.6180339887) % 1 * interval

        def make() -> str:
            wait = self.start_at - time.time()
            if wait < 0.5:
                self.late += 1
            delay = max(0.5, wait) + phase
            self.made[index] = (
                f"bench {tag} {name} sim:duration={self.duration} "
                f"sim:chunks={self.chunks} sim:delay={delay:.3f}"
            )
            return self.made[index]

        return make


def p4_growth(
    backend: str,
    web: Server,
    watcher_pid: int,
    lag_files: dict[str, str],
    sims: list[Server],
    data: dict[str, Any],
    sizes: list[int],
    watched: int,
    duration: float,
    chunks: int,
    profile: bool,
) -> dict[str, Any]:
    """P4 at each size in turn on the same web process and watcher: the growth table."""
    plan = StreamPlan(duration, chunks)
    # Whose CPU each size's streaming window used (the watcher is the web process when
    # embedded).
    pids = {"web": [web.pid], "simulators": [s.pid for s in sims]}
    if watcher_pid != web.pid:
        pids["watcher"] = [watcher_pid]
    out: dict[str, Any] = {
        "duration_s": duration,
        "chunks": chunks,
        "watched": watched,
        "sizes": {},
    }
    for n in sizes:
        started = time.monotonic()
        marks = {name: LagMark(f) for name, f in lag_files.items()}
        spy = None
        if profile and n == sizes[-1]:
            spy = Spy(f"p4-{backend}-{common.tree().name}", watcher_pid, plan, duration)
        try:
            res = p4_size(backend, web, pids, sims, data, n, min(n, watched), plan, spy)
        except Exception as exc:
            res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        res["loop_lag"] = lag_since(marks)
        if spy is not None:
            out["profile"] = spy.result()
        res["phase_seconds"] = round(time.monotonic() - started, 1)
        out["sizes"][str(n)] = res
        log(f"P4 {n} runs: {json.dumps(res)[:400]}")
        time.sleep(1)
    return out


class Spy:
    """py-spy on the process that runs the watcher, for the streaming window of the largest
    size (sampling from outside, not pausing it)."""

    def __init__(self, name: str, pid: int, plan: StreamPlan, duration: float) -> None:
        self.name = name
        self.pid = pid
        self.plan = plan
        self.duration = duration
        self.path = OUT / f"profile-{name}.txt"
        self.proc: Proc | None = None
        self.rate = 50

    def start(self) -> None:
        self.proc = Proc(
            f"py-spy-{self.name}",
            [
                str(ROOT / ".venv" / "bin" / "py-spy"),
                "record",
                "--nonblocking",
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--duration",
                str(int(self.duration)),
                "--pid",
                str(self.pid),
                "-o",
                str(self.path),
            ],
            env=env_for("sqlite"),
            cwd=ROOT,
        )

    def result(self) -> dict[str, Any]:
        if self.proc is None:
            return {"error": "not started"}
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.proc.wait(timeout=self.duration + 30)
        self.proc.stop()
        if not self.path.exists():
            return {"error": f"py-spy wrote nothing: {self.proc.tail(5)}"}
        return summarise(self.path.read_text(), self.rate, self.duration)


def p4_size(
    backend: str,
    web: Server,
    pids: dict[str, list[int]],
    sims: list[Server],
    data: dict[str, Any],
    n: int,
    watched: int,
    plan: StreamPlan,
    spy: Spy | None,
) -> dict[str, Any]:
    token = data["token"]
    accounts = data["ib_accounts"]
    tag = uuid.uuid4().hex[:6]
    lead = plan.begin(n, watched)
    # The watched sample first (one viewer per run page), then the rest; the accounts
    # alternate over the simulator processes.
    jobs = [
        (accounts[i % len(accounts)], plan.prompt(tag, f"{'w' if i < watched else 'r'}{i}", i))
        for i in range(n)
    ]
    launched_at = time.time()
    sample = launch(web.url, token, jobs[:watched], 32)
    launching = time.time() - launched_at
    ends = ChunkEnds(backend, [plan.made[i] for i in range(watched)], plan.chunks)
    urls = [ws_url(web, f"/ws/runs/{pk}/") for pk in sample]
    # The viewers connect (their own process) while the rest is launched; both are done
    # before the streams start.
    viewers_at = time.time()
    gen = Clients(urls, data["cookies"], len(urls))
    try:
        ids = sample + launch(web.url, token, jobs[watched:], 32)
        launching += time.time() - viewers_at
        gen.ready()
        gen.send("RECORD")
        gen.read()
        viewers_ready = time.time() - viewers_at
        launch_s = time.time() - launched_at
        plan.launch_rate = max(5.0, n / max(0.1, launching))
        plan.viewer_rate = max(5.0, watched / max(0.1, gen.ready()["seconds"]))
        viewers_late = time.time() > plan.start_at
        time.sleep(max(0.0, plan.start_at - time.time()))
        if spy is not None:
            spy.start()
        # CPU over the streaming window (none if the launches overran it).
        window = plan.start_at + plan.duration - time.time()
        cpu = CpuMark(pids)
        time.sleep(max(0.0, window))
        cpu_cores = cpu.cores() if window > plan.duration / 2 else {}
        with httpx.Client(timeout=60) as client:
            finals = wait_for(
                client,
                web.url,
                token,
                ids,
                lambda r: r["status"] in ("completed", "failed", "stopped"),
                plan.duration * 3 + 120,
                poll=0.5,
            )
            drained = time.time() - (plan.start_at + plan.duration)
            # The database can be ahead of the pushes: wait (bounded) until every viewer has
            # seen its run end; one that has not after that counts as lost.
            gen.send("UNTIL 30 completed|failed|stopped")
            gen.read(90)
            shown = time.time() - (plan.start_at + plan.duration)
            time.sleep(0.5)
            gen.send("DUMP")
            records = gen.read()["records"]
            lags = _p4_lags(ends, client, sims, accounts, sample, urls, finals, records, plan)
    finally:
        gen.close()
        ends.close()
    return {
        "runs": n,
        "work_chunks_per_s": round(n * plan.chunks / plan.duration, 1),
        "not_completed": sum(1 for r in finals.values() if r["status"] != "completed"),
        "watched": len(sample),
        **lags,
        "lead_s": round(lead, 1),
        "launch_s": round(launch_s, 1),
        "launches_per_s": round(n / max(0.1, launching), 1),
        "launched_late": plan.late,
        "viewers_ready_s": round(viewers_ready, 1),
        "viewers_late": viewers_late,
        "cpu_cores": cpu_cores,
        "viewers_connected": gen.ready()["ready"],
        "done_after_streams_s": round(drained, 1),
        "shown_after_streams_s": round(shown, 1),
    }


def _p4_lags(
    chunk_ends: ChunkEnds,
    client: httpx.Client,
    sims: list[Server],
    accounts: list[int],
    sample: list[int],
    urls: list[str],
    finals: dict[int, dict[str, Any]],
    records: dict[str, list[list[Any]]],
    plan: StreamPlan,
) -> dict[str, Any]:
    """Status lag: a viewer's first *Completed* minus the simulator's own finish time. Output
    lag, for every chunk: a viewer's first frame whose output end reaches the characters after
    that chunk, minus when the simulator emitted it (spaced evenly between the stream's start
    and its finish, which absorbs the simulator's drift under load)."""
    runs = [finals[pk] for pk in sample]
    if [r["prompt"] for r in runs] != chunk_ends.prompts:
        raise RuntimeError("the watched runs' prompts are not the ones launched")
    ends = chunk_ends.result()
    status_lag: list[float] = []
    output_lag: list[float] = []
    lost = missing = 0
    for run, url, cum in zip(runs, urls, ends, strict=True):
        recs = records.get(url, [])
        if run["status"] != "completed":
            continue
        done = [t for t, status, _ in recs if status == "completed"]
        if not done:
            lost += 1
        sim = sims[accounts.index(run["provider_account"])]
        st = client.get(
            f"{sim.url}/sim/intelligencebox/api/ai/chat/{run['external_id']}/stream-status",
            headers={"x-api-key": SIM_KEY},
        ).json()
        found = DELAY.search(run["prompt"])
        start = _ts(st["startTime"]) + (float(found.group(1)) if found else 0.0)
        finish = _ts(st["lastActivity"])
        if done:
            status_lag.append((done[0] - finish) * 1000)
        step = (finish - start) / max(1, plan.chunks)
        i = 0
        for k, chars in enumerate(cum):
            while i < len(recs) and recs[i][2] < chars:
                i += 1
            if i == len(recs):
                missing += len(cum) - k
                break
            output_lag.append((recs[i][0] - (start + k * step)) * 1000)
    return {
        "status_lag": summary(status_lag),
        "output_lag": summary(output_lag),
        "lost": lost,
        "output_chunks_never_shown": missing,
    }


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --- P5: the run list ------------------------------------------------------------------------


def p5_list(web: Server, seeded: dict[str, Any], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(timeout=60) as client:
        for label in ("big", "small"):
            url = f"{web.url}/teams/{seeded[f'{label}_team']}/runs/"
            cookies = {"sessionid": seeded[f"{label}_cookie"]}
            for _ in range(5):
                client.get(url, cookies=cookies)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.get(url, cookies=cookies)
                times.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
            out[label] = summary(times)
            out[f"{label}_rows"] = seeded[f"{label}_n"]
    out["ratio_p95"] = round(out["big"]["p95"] / out["small"]["p95"], 2)
    return out


def list_rps(web: Server, seeded: dict[str, Any], seconds: float, conc: int = 16) -> float:
    url = f"{web.url}/teams/{seeded['small_team']}/runs/"

    async def go() -> float:
        done = 0
        stop_at = time.monotonic() + seconds
        async with httpx.AsyncClient(
            timeout=30, cookies={"sessionid": seeded["small_cookie"]}
        ) as client:

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < stop_at:
                    r = await client.get(url)
                    r.raise_for_status()
                    done += 1

            started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(conc)))
            return done / (time.monotonic() - started)

    return round(asyncio.run(go()), 1)


def watcher_process(backend: str, lag_file: str) -> Proc:
    return Proc(
        f"watcher-{backend}-{common.tree().name}",
        [PY, "manage.py", "runwatcher", "--loop-lag-file", lag_file],
        env_for(backend, RUNBRAKE_EMBEDDED_WATCHER="false"),
    )
