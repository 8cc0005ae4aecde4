"""What the prediction log costs.

In one process, each figure next to its baseline:
  request path: time per single-row `log()` call (check + enqueue), with the writer idle and with the writer busy
                writing at the default settings (500 rows / 200 ms), versus a no-op function call
  writer:       sustained rows/s the writer thread inserts into SQLite (500-row transactions through SQLAlchemy),
                versus the same rows inserted with plain sqlite3 `executemany`, 500 rows per transaction
  read:         `read()` of 1,000,000 rows x 20 features in chunks of 100,000 (time and peak memory),
                versus fetching the same rows with plain sqlite3 and decoding nothing
                (each read runs in a forked child so that its peak memory is its own)
Features are 20 full-precision floats (e.g. 144.14285714285714): the worst case for JSON encoding.
BENCH_ROWS changes the 1,000,000 (e.g. BENCH_ROWS=200000 for a quick run).
"""
import json, os, shutil, sqlite3, statistics, sys, tempfile, time, timeit
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

from mlkit.logrules import check_row, encode_row
from mlkit.predlog import PredictionLog
from mlkit import logread  # noqa: F401  adds PredictionLog.read
from common import in_child  # bench/common.py: run in a forked child, measure its peak memory

N_READ = int(os.environ.get('BENCH_ROWS', 1_000_000))
N_CALLS = 50_000
N_WRITE = 200_000
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def row(i):
    return dict(request_id=f'r{i}', ts=T0 + timedelta(milliseconds=i), model_tag='churn:v1', entity=f'c{i % 5000}',
                prediction=i % 2, features={f'f{k}': (i * (k + 1)) % 1009 / 7 for k in range(20)},
                proba={0: 0.25, 1: 0.75}, latency_ms=2.5)


def per_call(f, rows, every=None):
    "Mean and p99 time of f([row]) over the rows, in microseconds; `every()` runs (untimed) after each 500 calls"
    ts, clock = [], time.perf_counter_ns
    for i, r in enumerate(rows):
        t = clock(); f([r]); ts.append(clock() - t)
        if every and i % 500 == 499: every()
    ts.sort()
    return statistics.fmean(ts) / 1e3, ts[int(len(ts) * 0.99)] / 1e3


def line(label, value, unit, note=''):
    print(f"  {label:<58} {value:>10.2f} {unit:<6} {note}")


def request_path(tmp):
    print(f"request path: one row per log() call, {N_CALLS:,} calls, 20 features")
    rows = [row(i) for i in range(N_CALLS)]
    def noop(rows): return None
    base = per_call(noop, rows)
    idle = PredictionLog(f'sqlite:///{tmp/"idle.db"}', batch_size=10**9, flush_ms=10**9, max_queue=10**9)
    idle.log([row(-1)]) # start the writer thread, which then waits
    t_idle = per_call(idle.log, rows, every=idle._q.clear) # emptied as the writer would, so the queue stays short
    busy = PredictionLog(f'sqlite:///{tmp/"busy.db"}') # defaults: 500 rows / 200 ms
    t_busy = per_call(busy.log, [dict(r, request_id='b' + r['request_id']) for r in rows])
    t = time.perf_counter(); busy.close(); drain = time.perf_counter() - t
    idle._q.clear(); idle.close()
    line('baseline: no-op function call', base[0], 'us', f"(p99 {base[1]:.2f} us)")
    line('log(): check + enqueue, writer idle', t_idle[0], 'us', f"(p99 {t_idle[1]:.2f} us)")
    line('log(): check + enqueue, writer busy at 500 rows / 200 ms', t_busy[0], 'us', f"(p99 {t_busy[1]:.2f} us)")
    f = rows[12345]['features']
    line('  for scale: json.dumps of one row\'s 20 features', min(timeit.repeat(lambda: json.dumps(f), number=2000, repeat=5)) / 2000 * 1e6, 'us')
    print(f"  (busy log: {busy.stats()['written']:,} rows written; close() drained the rest in {drain:.2f} s)")


def writer(tmp):
    print(f"writer: {N_WRITE:,} rows x 20 features into SQLite (WAL, synchronous=NORMAL), 500 rows per transaction")
    rows = [row(i) for i in range(N_WRITE)]
    plog = PredictionLog(f'sqlite:///{tmp/"w.db"}', batch_size=500, flush_ms=200, max_queue=10**9)
    plog.log(rows) # all queued before the writer thread starts
    t = time.perf_counter(); plog.flush(); took = time.perf_counter() - t
    assert plog.stats()['written'] == N_WRITE, plog.stats()
    plog.close()
    # baseline: the same values, already encoded, with plain sqlite3
    now = datetime.now(timezone.utc)
    vals = [check_row(r, i, now) for i, r in enumerate(rows)]
    t = time.perf_counter(); vals = [encode_row(v) for v in vals]; enc = time.perf_counter() - t
    cols = list(vals[0])
    tuples = [tuple(v[c] if c != 'ts' else v[c].strftime('%Y-%m-%d %H:%M:%S.%f') for c in cols) for v in vals]
    shutil.copy(tmp/'w.db', tmp/'raw.db')
    con = sqlite3.connect(tmp/'raw.db', isolation_level=None)
    con.execute('PRAGMA journal_mode=WAL'); con.execute('PRAGMA synchronous=NORMAL'); con.execute('DELETE FROM predictions')
    sql = f"INSERT INTO predictions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    t = time.perf_counter()
    for k in range(0, len(tuples), 500):
        con.execute('BEGIN IMMEDIATE'); con.executemany(sql, tuples[k:k + 500]); con.execute('COMMIT')
    raw = time.perf_counter() - t
    con.close()
    line('baseline: sqlite3 executemany, values already encoded', N_WRITE / raw, 'rows/s', f"({raw / N_WRITE * 1e6:.1f} us/row)")
    line('writer thread: encode JSON + executemany, one transaction each', N_WRITE / took, 'rows/s', f"({took / N_WRITE * 1e6:.1f} us/row)")
    line('  of which encoding features/proba as JSON', N_WRITE / enc, 'rows/s', f"({enc / N_WRITE * 1e6:.1f} us/row)")


def populate(db, n):
    "n rows straight into the predictions table (quickly: 1,000 distinct feature sets)"
    PredictionLog(f'sqlite:///{db}').engine.dispose()
    feats = [json.dumps(row(i)['features'], separators=(',', ':')) for i in range(1000)]
    con = sqlite3.connect(db, isolation_level=None)
    con.execute('PRAGMA journal_mode=WAL'); con.execute('PRAGMA synchronous=OFF')
    sql = ("INSERT INTO predictions (request_id, ts, variant, shadow, model_tag, entity, features, prediction, proba, latency_ms, status) "
           "VALUES (?, ?, 'champion', 0, 'churn:v1', ?, ?, ?, '{\"0\":0.25,\"1\":0.75}', 2.5, 200)")
    for s in range(0, n, 100_000):
        con.execute('BEGIN')
        con.executemany(sql, ((f'r{i}', (T0 + timedelta(milliseconds=i)).strftime('%Y-%m-%d %H:%M:%S.%f'), f'c{i % 5000}',
                               feats[i % 1000], str(i % 2)) for i in range(s, min(n, s + 100_000))))
        con.execute('COMMIT')
    con.close()


def raw_fetch(db):
    con = sqlite3.connect(db)
    t = time.perf_counter()
    cur = con.execute('SELECT * FROM predictions ORDER BY ts, id')
    n = 0
    while part := cur.fetchmany(100_000): n += len(part)
    return n, 0, time.perf_counter() - t


def log_read(db, with_features):
    plog = PredictionLog(f'sqlite:///{db}')
    t = time.perf_counter()
    n = ncol = 0
    for c in plog.read(chunksize=100_000, with_features=with_features): n += len(c); ncol = len(c.columns)
    return n, ncol, time.perf_counter() - t


def read(tmp):
    db = tmp/'r.db'
    t = time.perf_counter(); populate(db, N_READ); fill = time.perf_counter() - t
    size = db.stat().st_size / 2**20
    print(f"read: {N_READ:,} rows x 20 features ({size:,.0f} MB of SQLite, filled in {fill:.1f} s), chunks of 100,000, ordered by ts")
    (n0, _, raw), m0 = in_child(raw_fetch, db)
    (n1, ncol, took), m1 = in_child(log_read, db, True)
    (n2, _, nofeat), m2 = in_child(log_read, db, False)
    assert n0 == n1 == n2 == N_READ
    line('baseline: sqlite3 fetchmany, no decoding', raw, 's', f"(peak +{m0:,.0f} MB)")
    line(f'read(chunksize=100_000): DataFrames of {ncol} columns', took, 's', f"(peak +{m1:,.0f} MB; {N_READ / took:,.0f} rows/s; target well under 60 s)")
    line('read(chunksize=100_000, with_features=False)', nofeat, 's', f"(peak +{m2:,.0f} MB)")


def main():
    tmp = Path(tempfile.mkdtemp(prefix='mlkit-bench-predlog-'))
    try:
        print(f"prediction log bench (python {sys.version.split()[0]}, {psutil.cpu_count()} CPUs)")
        request_path(tmp)
        writer(tmp)
        read(tmp)
    finally: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
