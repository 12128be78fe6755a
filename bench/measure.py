"""The measurements (P1-P6 and the list rps), each against real server processes started for
it. Called by bench/run.py; every function returns plain numbers."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
from common import (
    OUT,
    PY,
    QUICK,
    ROOT,
    SIM_INSPECT_TOKEN,
    Proc,
    Server,
    env_for,
    log,
    pct,
    read_lag,
    rss_kib,
    summary,
)

STOPPED = 'data-status="stopped"'


class Clients:
    """A websocket load-generator process (bench/ws_clients.py)."""

    def __init__(self, urls: list[str], cookies: list[str], n: int, backend: str) -> None:
        spec = json.dumps({"urls": urls, "cookies": cookies, "n": n})
        self.proc = subprocess.Popen(
            [PY, str(ROOT / "bench" / "ws_clients.py"), spec],
            cwd=ROOT,
            env=env_for(backend),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self.read()

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
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
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def ws_url(server: Server, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def api(client: httpx.Client, method: str, url: str, token: str, **kw: Any) -> httpx.Response:
    return client.request(method, url, headers={"Authorization": f"Bearer {token}"}, **kw)


def launch(base: str, token: str, account: int, prompts: list[str], conc: int = 8) -> list[int]:
    async def go() -> list[int]:
        sem = asyncio.Semaphore(conc)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(prompt: str) -> int:
                async with sem:
                    r = await client.post(
                        f"{base}/api/runs",
                        headers={"Authorization": f"Bearer {token}"},
                        json={"provider_account": account, "prompt": prompt},
                    )
                    r.raise_for_status()
                    return int(r.json()["id"])

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(go())


def wait_for(
    client: httpx.Client, base: str, token: str, ids: list[int], pred: Any, timeout: float
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
        time.sleep(1.0)
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


def p1_stop_overhead(
    backend: str, web: Server, sim: Server, data: dict[str, Any], n: int
) -> dict[str, Any]:
    token, fay = data["token"], data["accounts"]["fay"]
    tag = uuid.uuid4().hex[:6]
    ids = launch(
        web.url, token, fay, [f"p1 {tag} {i} sim:pending=0 sim:duration=900" for i in range(n)]
    )
    with httpx.Client(timeout=30) as client:
        runs = wait_for(client, web.url, token, ids, lambda r: r["external_id"], 120)
        # Bare calls: the same stop endpoint of the same simulator, on runs made directly.
        sim_fay = f"{sim.url}/sim/fay/api/v1"
        key = {"Authorization": "Bearer sim-bench-key", "Content-Type": "application/json"}
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
            r = api(client, "POST", f"{web.url}/api/runs/{pk}/stop", token, json={})
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
    backend: str,
    webs: list[Server],
    data: dict[str, Any],
    viewers: int,
    trials: int,
) -> dict[str, Any]:
    token, fay, team = data["token"], data["accounts"]["fay"], data["team"]
    tag = uuid.uuid4().hex[:6]
    base = webs[0].url
    ids = launch(
        base, token, fay, [f"p2 {tag} {i} sim:pending=0 sim:duration=900" for i in range(trials)]
    )
    with httpx.Client(timeout=30) as client:
        wait_for(client, base, token, ids, lambda r: r["external_id"], 120)
    # Every viewer watches the team's shared list (its newest page shows these runs), spread
    # over the web processes and over two load-generator processes.
    urls = [ws_url(w, f"/ws/teams/{team}/") for w in webs]
    gens = [Clients(urls, data["cookies"], viewers // 2, backend) for _ in range(2)]
    connected = sum(g.ready["ready"] for g in gens)
    failed = sum(g.ready["failed"] for g in gens)
    lat: list[float] = []
    lost = 0
    try:
        with httpx.Client(timeout=30) as client:
            for pk in ids:
                marker = f'id="run-row-{pk}" data-version="\\d+" data-status="stopped"'
                for g in gens:
                    g.send(f"WATCH 10 {marker}")
                for g in gens:
                    g.read()  # armed
                t0 = time.time()
                api(client, "POST", f"{base}/api/runs/{pk}/stop", token, json={})
                for g in gens:
                    got = g.read()
                    lat += [(t - t0) * 1000 for t in got["times"]]
                    lost += got["sockets"] - len(got["times"])
                time.sleep(0.3)
    finally:
        for g in gens:
            g.close()
    return {"viewers": connected, "connect_failed": failed, "latency": summary(lat), "lost": lost}


# --- P3: idle sockets --------------------------------------------------------------------------


def p3_capacity(backend: str, web: Server, data: dict[str, Any], n: int) -> dict[str, Any]:
    # Idle viewers of run pages (the cheaper snapshot keeps connecting 5,000 within the
    # bench's time box); each socket's run is stopped at the end to prove it is alive.
    token, fay = data["token"], data["accounts"]["fay"]
    ids = launch(web.url, token, fay, [f"p3 {i} sim:pending=0 sim:duration=900" for i in range(10)])
    urls = [ws_url(web, f"/ws/runs/{pk}/") for pk in ids]
    warm = Clients(urls, data["cookies"], 20, backend)
    gens: list[Clients] = []
    try:
        return _p3_measure(backend, web, data, n, ids, urls, gens)
    finally:
        for g in [*gens, warm]:
            g.close()


def _p3_measure(
    backend: str,
    web: Server,
    data: dict[str, Any],
    n: int,
    ids: list[int],
    urls: list[str],
    gens: list[Clients],
) -> dict[str, Any]:
    token = data["token"]
    time.sleep(1)
    before = web.rss_kib()
    started = time.monotonic()
    per_gen = n // 2
    gens += [Clients(urls, data["cookies"], per_gen, backend) for _ in range(2)]
    connect_s = time.monotonic() - started
    connected = sum(g.ready["ready"] for g in gens)
    time.sleep(3)
    after = web.rss_kib()
    # Still alive? Stopping their runs reaches every idle socket (also counted for P6).
    with httpx.Client(timeout=30) as client:
        wait_for(client, web.url, token, ids, lambda r: r["external_id"], 60)
        for g in gens:
            g.send(f"WATCH 30 {STOPPED}")
        for g in gens:
            g.read()
        t0 = time.time()
        for pk in ids:
            api(client, "POST", f"{web.url}/api/runs/{pk}/stop", token, json={})
        lat: list[float] = []
        lost = 0
        for g in gens:
            got = g.read()
            lat += [(t - t0) * 1000 for t in got["times"]]
            lost += got["sockets"] - len(got["times"])
    return {
        "sockets": connected,
        "connect_seconds": round(connect_s, 1),
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "kib_per_socket": round((after - before) / max(1, connected), 1),
        "broadcast": summary(lat),
        "lost": lost,
    }


# --- P4: the watcher with many streaming runs ----------------------------------------------


def p4_watcher(
    backend: str,
    web: Server,
    sims: list[Server],
    data: dict[str, Any],
    n: int,
    watched: int,
    duration: float,
    chunks: int,
) -> dict[str, Any]:
    token = data["token"]
    accounts = data["ib_accounts"]
    tag = uuid.uuid4().hex[:6]
    # Each run's stream starts after a delay (under the providers' 30 s silence limit), and
    # the watched runs are launched and their viewers connected before the rest is launched,
    # so that every viewer is listening before its run streams.
    delay = 20 if n > 300 else 10
    prompt = f"bench {tag} sim:duration={duration} sim:chunks={chunks} sim:delay={delay}"

    def launch_share(count: int, part: str) -> list[int]:
        # Through the API (the real path), spread over the simulator processes.
        out: list[int] = []
        for i, account in enumerate(accounts):
            share = count // len(accounts) + (1 if i < count % len(accounts) else 0)
            out += launch(
                web.url, token, account, [f"{prompt} {part}{i}-{j}" for j in range(share)], 16
            )
        return out

    started = time.time()
    sample = launch_share(watched, "w")
    urls = [ws_url(web, f"/ws/runs/{pk}/") for pk in sample]
    gen = Clients(urls, data["cookies"], len(urls), backend)
    gen.send("RECORD")
    gen.read()
    viewers_ready = round(time.time() - started, 1)
    ids = sample + launch_share(n - watched, "r")
    launched = time.time()
    with httpx.Client(timeout=60) as client:
        finals = wait_for(
            client,
            web.url,
            token,
            ids,
            lambda r: r["status"] in ("completed", "failed", "stopped"),
            delay + duration * 4 + 120,
        )
    time.sleep(1.0)
    gen.send("DUMP")
    records = gen.read()["records"]
    gen.close()
    from simulators.intelligencebox import answer_chunks

    status_lag, output_lag = [], []
    lost = 0
    for pk, url in zip(sample, urls, strict=True):
        run = finals[pk]
        recs = records.get(url, [])
        if run["status"] != "completed":
            continue
        done = [t for t, status, _ in recs if status == "completed"]
        if not done:
            lost += 1
            continue
        sim = sims[accounts.index(run["provider_account"])]
        st = httpx.get(
            f"{sim.url}/sim/intelligencebox/api/ai/chat/{run['external_id']}/stream-status",
            headers={"x-api-key": "sim-bench-key"},
        ).json()
        start = _ts(st["startTime"]) + delay
        finish = _ts(st["lastActivity"])
        status_lag.append((done[0] - finish) * 1000)
        # Chunk k's emission time, scaled between the first and the last chunk (absorbs the
        # simulator's own drift under load).
        cum, total = [], 0
        for c in answer_chunks(run["prompt"], chunks):
            total += len(c)
            cum.append(total)
        step = (finish - start) / max(1, chunks)
        for t, _status, chars in recs:
            if chars <= 0 or chars not in cum:
                continue
            k = cum.index(chars)
            output_lag.append((t - (start + k * step)) * 1000)
    errors = sum(1 for r in finals.values() if r["status"] != "completed")
    return {
        "runs": n,
        "not_completed": errors,
        "watched": len(sample),
        "status_lag": summary(status_lag),
        "output_lag": summary(output_lag),
        "lost": lost,
        "seconds": round(time.time() - launched, 1),
        "viewers_ready_after_s": viewers_ready,
        "viewers_connected": gen.ready["ready"],
        "viewers_failed": gen.ready["failed"],
        "stream_delay_s": delay,
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


def lag_summary(paths: list[str]) -> dict[str, float]:
    values: list[float] = []
    for p in paths:
        values += read_lag(p)
    return summary(values)


def watcher_process(backend: str, lag_file: str) -> Proc:
    return Proc(
        f"watcher-{backend}",
        [PY, str(ROOT / "manage.py"), "runwatcher", "--loop-lag-file", lag_file],
        env_for(backend, RUNBRAKE_EMBEDDED_WATCHER="false"),
    )


__all__ = ["OUT", "QUICK", "log", "pct", "re", "rss_kib"]
