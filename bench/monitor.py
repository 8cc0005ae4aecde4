"""What the monitoring job costs on a large log.

Trains a champion on a 20-feature table (the embedded churn data plus 12 generated columns), fills the prediction log
(SQLite) with 1,000,000 predictions over 7 days, 30% of them labeled, and times, in one run:
  floor:  one vectorized pass over the same window in a forked child: `PredictionLog.read` in chunks of 200,000 rows
          and a histogram (numeric) or value counts (categorical) per feature, nothing else
  mlkit:  `mlkit monitor` for the window: papermill runs nbs/jobs/monitor.ipynb (drift, tests, skew, invariants,
          quality with intervals, A/B, plots) and writes report.html
and prints the peak resident memory of each (the floor's above its start; the job kernel's whole process).
Targets: the job under 60 s, under 2 GiB.
The log's rows are 100,000 distinct scored requests repeated 10 times with new ids and times (scoring a million rows
would time the model, not the monitoring). BENCH_ROWS changes the 1,000,000.
"""
import json, os, sqlite3, subprocess, sys, tempfile, time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N = int(os.environ.get('BENCH_ROWS', 1_000_000))
T0 = datetime(2026, 2, 1, tzinfo=timezone.utc)
ENV = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'}

from mlkit.config import load_settings
from mlkit.datasets import churn, churn_day
from mlkit.jobs import scratch_project
from mlkit.predlog import PredictionLog
from mlkit import logread  # noqa: F401  adds PredictionLog.read, which floor() reads with
from mlkit.retrain import run_steps
from mlkit.service import Variant, predict_outputs
from mlkit.store import load_pipeline
from common import in_child  # bench/common.py: run in a forked child, measure its peak memory


def wide(df, seed):
    "`df` with 12 more feature columns: 8 numeric, 4 categorical"
    rng, n = np.random.default_rng(seed), len(df)
    out = df.copy()
    for k in range(8):
        out[f'x{k}'] = (rng.lognormal(k % 3, 0.5, n) if k % 2 else rng.normal(10 * k, 1 + k, n)).round(3)
    for k in range(4):
        out[f'c{k}'] = rng.choice([f'v{j}' for j in range(3 + 4 * k)], n)
    return out


def fill_log(s, tag, pipe, meta):
    "N predictions straight into the SQLite log: 100,000 scored requests repeated with new ids and times"
    db = s.state_dir/'predictions.db'
    PredictionLog.from_settings(s).engine.dispose()
    base = wide(churn_day(0, n=min(N, 100_000), seed=1), 1)
    feats = [c for c in meta['features']]
    preds, probas = predict_outputs(Variant('champion', tag, pipe, meta), base[feats])
    ftext = base[feats].to_json(orient='records', lines=True).splitlines()
    ptext = [json.dumps(p, separators=(',', ':')) for p in probas]
    labels = base['churned'].to_numpy()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute('PRAGMA journal_mode=WAL'); con.execute('PRAGMA synchronous=OFF')
    sql = ("INSERT INTO predictions (request_id, ts, variant, shadow, model_tag, entity, features, prediction, proba, latency_ms, status, label, label_at) "
           "VALUES (?, ?, 'champion', 0, ?, NULL, ?, ?, ?, ?, 200, ?, ?)")
    rng, step, m = np.random.default_rng(0), 7 * 86_400_000 / N, len(base)
    for lo in range(0, N, 100_000):
        con.execute('BEGIN')
        rows = []
        for i in range(lo, min(N, lo + 100_000)):
            t = (T0 + timedelta(milliseconds=i * step)).strftime('%Y-%m-%d %H:%M:%S.%f')
            lab = rng.random() < 0.3
            rows.append((f'r{i}', t, tag, ftext[i % m], str(preds[i % m]), ptext[i % m], 2.0 + (i % 7),
                         str(int(labels[i % m])) if lab else None, t if lab else None))
        con.executemany(sql, rows)
        con.execute('COMMIT')
    con.close()
    return db


def floor(url, features, kinds):
    "One pass: read in chunks, one histogram or value count per feature"
    t = time.perf_counter()
    n = 0
    for ch in PredictionLog(url).read(chunksize=200_000):
        n += len(ch)
        for f in features:
            if kinds[f] == 'numeric': np.histogram(pd.to_numeric(ch[f], errors='coerce').dropna(), 10)
            else: ch[f].value_counts()
    return n, time.perf_counter() - t


def main():
    tmp = Path(tempfile.mkdtemp(prefix='mlkit-bench-monitor-'))
    ini = scratch_project(ROOT/'settings.ini', tmp)
    wide(churn(4000, seed=0), 0).to_parquet(tmp/'wide.parquet', index=False)
    ini.write_text(ini.read_text().replace('source = builtin:churn', f"source = {tmp/'wide.parquet'}"))
    t = time.perf_counter()
    tag = run_steps(str(ini))['model_tag']
    s = load_settings(ini, env={})
    pipe, info = load_pipeline(tag, s)
    meta = info['metadata']
    print(f"champion {tag}: {len(meta['features'])} features, trained in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    db = fill_log(s, tag, pipe, meta)
    print(f"log: {N:,} predictions over 7 days, 30% labeled ({db.stat().st_size / 2**20:,.0f} MB of SQLite, filled in {time.perf_counter() - t:.1f} s)")

    kinds = {f: meta['contract']['columns'][f]['kind'] for f in meta['features']}
    (n, took), mem = in_child(floor, f'sqlite:///{db}', meta['features'], kinds)
    assert n == N, n
    t = time.perf_counter()
    res = subprocess.run([str(BIN/'mlkit'), 'monitor', '--since', '2026-02-01', '--until', '2026-02-08'], capture_output=True, text=True,
                         env={**ENV, 'MLKIT_SETTINGS': str(ini)}, cwd=tmp)
    job = time.perf_counter() - t
    if res.returncode not in (0, 4, 5): sys.exit(f"mlkit monitor failed ({res.returncode}):\n{res.stderr[-3000:]}")
    run = sorted((s.state_dir/'runs').glob('*-monitor-*'))[-1]
    summary = json.loads((run/'summary.json').read_text())
    assert summary['rows'] == N, summary['rows']
    print(f"monitoring {N:,} logged predictions x {len(kinds)} features (verdict: {summary['verdict']})")
    print(f"  {'floor: read in chunks + one histogram per feature':<52} {took:7.1f} s   peak +{mem:,.0f} MB")
    print(f"  {'mlkit monitor: papermill job, report.html':<52} {job:7.1f} s   peak {summary['peak_rss_mb']:,.0f} MB (job kernel)")
    print(f"  {'  of which reading the log (chunks, cast features)':<52} {summary.get('read_s', float('nan')):7.1f} s")
    print(f"  {'  job / floor':<52} {job / took:7.2f} x")
    print(f"  target: under 60 s ({'met' if job < 60 else 'NOT met'}), under 2 GiB ({'met' if summary['peak_rss_mb'] < 2048 else 'NOT met'})")


if __name__ == '__main__':
    main()
