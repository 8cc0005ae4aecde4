"""Serving throughput and latency, mlkit's service beside a plain FastAPI app and the in-process limit, in one run.

Trains a champion in a scratch project, then drives single-record POST /predict requests with wrk on 127.0.0.1 at
concurrency 1, 8 and 32 against:
  mlkit:  `mlkit serve` (BentoML, adaptive batching, input validation, prediction log on and durable), [serve] workers
  async:  the same with `[serve] log_durable = false` (answers before their rows are committed), run alternately
          with a second durable server, both up at once
  plain:  bench/plain_app.py, FastAPI + uvicorn with the same number of workers, predict once per request, no log
and measures the in-process predict limit of the same pipeline for batches of 1, 64 and 1,024 rows.
Target at concurrency 32: mlkit >= 1.5x plain's throughput, p99 < 100 ms, no 503 (non-2xx answers are counted);
the durable log costs at most 15 % of the asynchronous writer's throughput.
Needs wrk (Debian package `wrk`; `make bench` installs it when missing).
"""
import json, os, re, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tests'))
from service_util import Server  # noqa: E402
from conftest import BIN, free_port  # noqa: E402

DURATION = os.environ.get('BENCH_DURATION', '10s')
LEVELS = [int(c) for c in os.environ.get('BENCH_CONCURRENCY', '1,8,32').split(',')]


def wrk(url, body, conc, headers=None):
    script = Path(tempfile.mkdtemp())/'post.lua'
    hdr = ''.join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in {'Content-Type': 'application/json', **(headers or {})}.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n{hdr}')
    out = subprocess.run(['wrk', '-t', '1' if conc < 8 else '2', '-c', str(conc), '-d', DURATION, '--latency', '-s', str(script), url],
                         capture_output=True, text=True, check=True).stdout
    def ms(label):
        m = re.search(rf'^\s*{label}\s+([\d.]+)(us|ms|s)\s*$', out, re.M)
        return float(m.group(1)) * {'us': 0.001, 'ms': 1, 's': 1000}[m.group(2)] if m else float('nan')
    rps = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r'Non-2xx or 3xx responses:\s+(\d+)', out)) else 0
    errors = sum(int(x) for x in re.findall(r'(?:connect|read|write|timeout) (\d+)', out))
    return dict(rps=rps, p50=ms('50%'), p99=ms('99%'), non2xx=non2xx, errors=errors)


def in_process(pipe, df):
    import numpy as np
    res = {}
    for n in (1, 64, 1024):
        X = df.sample(n, replace=True, random_state=0)
        reps, t = max(20, 20_000 // n), time.perf_counter()
        for _ in range(reps): pipe.predict_proba(X)
        res[n] = reps * n / (time.perf_counter() - t)
    return res


def main():
    if not shutil.which('wrk'): sys.exit("bench/serve.py needs wrk: apt-get install -y wrk (make bench does it)")
    os.environ['OMP_NUM_THREADS'] = '1'
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    from mlkit.jobs import scratch_project
    load_before = os.getloadavg()  # other work on the machine skews every figure: printed beside them
    ini = scratch_project(ROOT/'settings.ini')
    try: run(ini, load_before)
    finally: shutil.rmtree(ini.parent, ignore_errors=True)


def run(ini, load_before):
    from mlkit.config import load_settings
    from mlkit.datasets import churn_day
    from mlkit.retrain import run_steps
    from mlkit.service import serving_refs, frame_to_records
    from mlkit.store import load_pipeline
    run_steps(str(ini))
    s = load_settings(ini, env={})
    df = churn_day(0, n=2000).drop(columns=['churned', 'event_time'])
    body = json.dumps({'records': frame_to_records(df.head(1))})
    pipe, _ = load_pipeline(serving_refs(s)['champion'][0], s)
    limits = in_process(pipe, df)
    workers = s.serve.workers
    results = {}
    with Server(ini, workers=workers) as srv:
        for c in LEVELS: results[('mlkit', c)] = wrk(f'{srv.url}/predict', body, c)
    from mlkit.predlog import PredictionLog
    from mlkit import logread  # noqa: F401  adds PredictionLog.count
    logged = PredictionLog.from_settings(s).count()
    # durable against asynchronous logging: both servers up at once, runs alternated, so that a change in the machine's load hits both
    with Server(ini, workers=workers) as dur, Server(ini, workers=workers, env={'MLKIT_SERVE_LOG_DURABLE': 'false'}) as asy:
        for c in LEVELS:
            runs = {'durable': [], 'async': []}
            for _ in range(2):
                for name, srv in (('durable', dur), ('async', asy)): runs[name].append(wrk(f'{srv.url}/predict', body, c))
            for name, rs in runs.items():
                results[(name, c)] = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
    # shadow mode: a challenger predicts every request for the log only; the answer must not get slower
    from mlkit.registry import Registry
    chal = run_steps(str(ini), model='logistic_regression', force=True)['model_tag']
    reg = Registry.from_settings(s)
    if reg.champion()['tag'] == chal:
        reg.rollback('bench', 'keep the first model as champion'); reg.set_stage(chal, 'challenger', actor='bench', reason='shadow')
    shadow_levels = [c for c in LEVELS if c > 1] or LEVELS
    with Server(ini, workers=workers) as srv:
        for c in shadow_levels: results[('champion-again', c)] = wrk(f'{srv.url}/predict', body, c)
    with Server(ini, workers=workers, env={'MLKIT_SERVE_MODE': 'shadow'}) as srv:
        for c in shadow_levels: results[('shadow', c)] = wrk(f'{srv.url}/predict', body, c)
    import httpx
    probe = lambda srv: httpx.post(f'{srv.url}/predict', content=body, headers={'Content-Type': 'application/json'}, timeout=2).status_code == 200
    plain = Server(ini, cmd=[str(BIN/'uvicorn'), 'plain_app:app', '--host', '127.0.0.1', '--port', '{port}', '--workers', str(workers),
                             '--no-access-log', '--log-level', 'warning', '--app-dir', str(ROOT/'bench')], ready=probe).start()
    try:
        for c in LEVELS: results[('plain', c)] = wrk(f'{plain.url}/predict', body, c)
    finally: plain.stop()

    print(f"single-record POST /predict on 127.0.0.1, {workers} workers each, wrk {DURATION} per level, {os.cpu_count()}-core machine; "
          f"load average {' '.join(f'{x:.2f}' for x in load_before)} before the run, {' '.join(f'{x:.2f}' for x in os.getloadavg())} after")
    print(f"{'server':<8}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'errors':>8}")
    for c in LEVELS:
        for name in ('plain', 'mlkit'):
            r = results[(name, c)]
            print(f"{name:<8}{c:>6}{r['rps']:>10.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['non2xx']:>9}{r['errors']:>8}")
    print(f"in-process predict_proba limit: " + ', '.join(f"batch {n}: {v:,.0f} rows/s" for n, v in limits.items()))
    total = sum(results[('mlkit', c)]['rps'] for c in LEVELS)
    print(f"prediction log rows after the mlkit runs: {logged:,}")
    for c in shadow_levels:
        a, b = results[('champion-again', c)], results[('shadow', c)]
        print(f"shadow mode at concurrency {c}: p50 {b['p50']:.1f} ms vs {a['p50']:.1f} ms without ({(b['p50'] / a['p50'] - 1):+.0%}), "
              f"p99 {b['p99']:.1f} vs {a['p99']:.1f} ms, {b['rps']:.0f} vs {a['rps']:.0f} req/s")
    for c in LEVELS:
        d, a = results[('durable', c)], results[('async', c)]
        cost = 1 - d['rps'] / a['rps'] if a['rps'] else float('nan')
        print(f"durable log at concurrency {c}: {d['rps']:.0f} vs {a['rps']:.0f} req/s asynchronous ({cost:+.1%} cost, target <= 15%), "
              f"p99 {d['p99']:.1f} vs {a['p99']:.1f} ms (two alternated runs of each, averaged)")
    c = max(LEVELS)
    m, p = results[('mlkit', c)], results[('plain', c)]
    ratio = m['rps'] / p['rps'] if p['rps'] else float('nan')
    ok = ratio >= 1.5 and m['p99'] < 100 and m['non2xx'] == 0
    print(f"at concurrency {c}: mlkit/plain throughput {ratio:.2f}x (target >= 1.5x), mlkit p99 {m['p99']:.1f} ms (target < 100), "
          f"non-2xx {m['non2xx']} (target 0): {'met' if ok else 'NOT met'}")


if __name__ == '__main__':
    main()
