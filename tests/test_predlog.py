"""The prediction log beyond the notebook: several writer processes on one SQLite file (closed, SIGTERMed, forked),
a database that locks or goes away and comes back, read speed, and the notebook's round trips on a real PostgreSQL server."""
import glob, multiprocessing, os, pwd, re, shutil, signal, sqlite3, subprocess, sys, tempfile, textwrap, threading, time, uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from conftest import ROOT, free_port
from mlkit.predlog import LabelConflict, PredictionLog, PredictionLogError
import mlkit.logread, mlkit.logexport  # noqa: F401  add PredictionLog.count, .read and .export_parquet
from mlkit.logread import LOG_COLUMNS

T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
FEATURES = [f'f{k}' for k in range(20)]

# A service worker: logs N single-row predictions, says so, then either closes the log or waits for SIGTERM, which it
# turns into a normal exit as uvicorn and BentoML do (so the log's atexit hook writes what is still queued).
WORKER = textwrap.dedent('''
    import signal, sys, time
    from mlkit.predlog import PredictionLog
    url, wid, n, batch, flush_ms, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    plog = PredictionLog(url, batch_size=batch, flush_ms=flush_ms)
    for i in range(n):
        plog.log([dict(request_id=f"{wid}-{i}", model_tag="churn:v1", entity=f"c{i % 97}", prediction=i % 2,
                       features={f"f{k}": (i * k) % 101 / 7 for k in range(20)}, proba={0: 0.3, 1: 0.7}, latency_ms=1.0)])
        if i % 250 == 0: time.sleep(0.002) # spread the traffic so the processes' batches interleave
    print("logged", plog.stats()["queued"], flush=True)
    if how == "close":
        plog.close()
        print("closed", plog.stats()["written"], flush=True)
    else: time.sleep(600)
''')


def row(rid, i=0, **kw):
    return dict(dict(request_id=rid, ts=T0 + timedelta(minutes=i), model_tag='churn:v1', entity=f'c{i}', prediction=i % 2,
                     features={f: (i * k) % 11 / 4 for k, f in enumerate(FEATURES)} | {'plan': 'pro' if i % 2 else 'basic'},
                     proba={0: 0.25, 1: 0.75}, latency_ms=2.5), **kw)


def start_workers(url, n_procs, n_rows, batch, flush_ms, hows):
    procs = [subprocess.Popen([sys.executable, '-c', WORKER, url, f'w{p}', str(n_rows), str(batch), str(flush_ms), hows[p]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for p in range(n_procs)]
    return procs


def wait_line(proc, prefix, timeout=120):
    "The first stdout line of `proc` that starts with `prefix` (fails with its stderr if it exits first)"
    box = []
    def read():
        for line in proc.stdout:
            if line.startswith(prefix): box.append(line); return
    th = threading.Thread(target=read, daemon=True); th.start(); th.join(timeout)
    if not box: pytest.fail(f"worker gave no {prefix!r} line within {timeout} s; exit {proc.poll()}; stderr:\n{proc.stderr.read() if proc.poll() is not None else ''}")
    return box[0].split()


def check_sqlite(db, n):
    con = sqlite3.connect(db)
    try:
        assert con.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        assert con.execute('SELECT count(*), count(DISTINCT request_id) FROM predictions').fetchone() == (n, n)
    finally: con.close()


# ---------------------------------------------------------------------------------------------------------------
# Several processes, one SQLite file

@pytest.mark.parametrize('mode', ['contended', 'at_shutdown'])
def test_four_processes_one_sqlite_file(tmp_path, mode):
    """4 processes x 5,000 rows; two close() the log, two get SIGTERM.
    contended: small batches every 5 ms, so the processes fight for the write lock the whole time;
    at_shutdown: nothing is written before the end, so all 20,000 rows are written during shutdown, at once."""
    db = tmp_path/'predictions.db'
    url = f'sqlite:///{db}'
    PredictionLog(url).engine.dispose() # create the file first, as the service does at start-up
    batch, flush_ms = (50, 5) if mode == 'contended' else (100_000, 600_000)
    hows = ['close', 'sigterm', 'close', 'sigterm']
    procs = start_workers(url, 4, 5_000, batch, flush_ms, hows)
    try:
        queued = [int(wait_line(p, 'logged')[1]) for p in procs]
        if mode == 'at_shutdown': assert queued == [5_000] * 4 # everything still in memory when the process is told to stop
        for p, how in zip(procs, hows):
            if how == 'sigterm': p.send_signal(signal.SIGTERM)
        codes = [p.wait(120) for p in procs]
        assert codes == [0] * 4, [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    check_sqlite(db, 20_000)
    with PredictionLog(url) as plog:
        df = plog.read(with_features=False)
        assert sorted(df.request_id.str.split('-').str[0].value_counts().tolist()) == [5_000] * 4
        assert len(plog.read(chunksize=7_000).__next__().columns) == len(LOG_COLUMNS) + 2 + 20


def test_forked_worker_keeps_its_own_queue(tmp_path):
    "A worker forked from a process that has logged starts with an empty queue: nothing is written twice"
    url = f'sqlite:///{tmp_path/"p.db"}'
    plog = PredictionLog(url, batch_size=10_000, flush_ms=600_000)
    assert plog.count() == 0 # the parent holds a pooled connection when it forks
    plog.log([row(f'parent-{i}', i) for i in range(100)]) # queued, not written yet
    ctx = multiprocessing.get_context('fork')
    def child():
        if plog.count() != 0: os._exit(4) # reads on its own connection, not the parent's
        plog.log([row(f'child-{i}', i) for i in range(50)])
        plog.close()
        os._exit(0 if plog.stats()['written'] == 50 else 3)
    p = ctx.Process(target=child); p.start(); p.join(60)
    assert p.exitcode == 0
    plog.close()
    assert plog.stats()['written'] == 100
    check_sqlite(tmp_path/'p.db', 150)


# ---------------------------------------------------------------------------------------------------------------
# Failures

def test_sqlite_locked_past_the_busy_timeout(tmp_path, monkeypatch):
    "Another process holds the write lock longer than the busy timeout: batches fail, stay queued and are written later"
    import mlkit.db
    monkeypatch.setattr(mlkit.db, 'BUSY_TIMEOUT_MS', 100) # read by make_engine (the engine's busy timeout)
    db = tmp_path/'p.db'
    plog = PredictionLog(f'sqlite:///{db}', batch_size=10, flush_ms=5)
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
        import sqlite3, sys, time
        con = sqlite3.connect({str(db)!r}, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE"); print("locked", flush=True); time.sleep(2); con.execute("COMMIT")''')],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().startswith('locked')
        t = time.perf_counter()
        for i in range(200): plog.log([row(f'r{i}', i)])
        assert time.perf_counter() - t < 1 # the request path never waits for the lock
        deadline = time.monotonic() + 10
        while plog.stats()['failed_batches'] == 0 and time.monotonic() < deadline: time.sleep(0.02)
        s = plog.stats()
        assert s['failed_batches'] >= 1 and 'locked' in s['last_error'], s
    finally: holder.wait(30)
    plog.flush(timeout=30)
    plog.close()
    assert plog.stats()['written'] == 200 and plog.stats()['dropped'] == 0
    check_sqlite(db, 200)


def test_read_in_chunks(tmp_path):
    "100,000 rows x 20 features read in chunks of the asked size with every column (bench/predlog.py measures the pace)"
    url = f'sqlite:///{tmp_path/"p.db"}'
    with PredictionLog(url, batch_size=5_000, flush_ms=50) as plog:
        for s in range(0, 100_000, 5_000): plog.log([row(f'r{i}', i % 5000) for i in range(s, s + 5_000)])
        plog.flush()
        chunks = [(len(c), len(c.columns)) for c in plog.read(chunksize=25_000)]
    assert chunks == [(25_000, len(LOG_COLUMNS) + 2 + 21)] * 4


# ---------------------------------------------------------------------------------------------------------------
# A real PostgreSQL server

def _pg_bin():
    "Folder of the newest PostgreSQL server binaries, or None"
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'), key=lambda p: int(re.search(r'/(\d+)/bin/', p)[1]))
    if found: return Path(found[-1]).parent
    initdb = shutil.which('initdb')
    return Path(initdb).parent if initdb and shutil.which('pg_ctl') else None


def _require_pg_bin():
    "The server binaries, or a failure that says how to get them (`make test` installs them in its setup step)"
    if b := _pg_bin(): return b
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed (looked in /usr/lib/postgresql/*/bin and PATH): "
                "run `make test-deps` as root, or install Debian's postgresql package")


def test_missing_pg_binaries_say_what_to_run(monkeypatch):
    "No server binaries: the fixture fails naming the make target, instead of installing anything itself"
    monkeypatch.setattr(sys.modules[__name__], '_pg_bin', lambda: None)
    with pytest.raises(pytest.fail.Exception, match='run `make test-deps` as root'): _require_pg_bin()


@pytest.fixture(scope='module')
def pg():
    """A throwaway PostgreSQL server for this module: its own data folder in a temp folder, listening on 127.0.0.1 only,
    on a free port, unix socket in the temp folder, trust authentication; stopped and deleted afterwards, whatever happens"""
    bin_ = _require_pg_bin()
    root = Path(tempfile.mkdtemp(prefix='mlkit-pg-'))
    as_pg = []
    if os.geteuid() == 0: # initdb and postgres refuse to run as root
        try: pw = pwd.getpwnam('postgres')
        except KeyError: pytest.fail("running as root, but there is no `postgres` user to run the server as (apt-get install postgresql creates it)")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_pg = ['runuser', '-u', 'postgres', '--']
    data, log, port = root/'data', root/'server.log', free_port()
    def run(*args, check=True):
        r = subprocess.run(as_pg + [str(a) for a in args], cwd=root, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            tail = log.read_text()[-3000:] if log.exists() else ''
            pytest.fail(f"{' '.join(map(str, args))} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}\n{tail}")
        return r
    server = dict(port=port, url=f'postgresql+psycopg://postgres@127.0.0.1:{port}/postgres', data=data,
                  start=lambda: run(bin_/'pg_ctl', '-D', data, '-l', log, '-w', '-t', '60', '-o',
                                    f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", 'start'),
                  stop=lambda: run(bin_/'pg_ctl', '-D', data, '-m', 'fast', '-w', 'stop', check=False))
    try:
        run(bin_/'initdb', '-D', data, '-U', 'postgres', '-E', 'UTF8', '--auth=trust', '--no-sync')
        run('sh', '-c', f"printf 'local all all trust\\nhost all all 127.0.0.1/32 trust\\n' > {data/'pg_hba.conf'}")
        server['start']()
        yield server
    finally:
        if (data/'postmaster.pid').exists(): server['stop']()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg):
    "A fresh database on the test server for one test"
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg['url'], isolation_level='AUTOCOMMIT', poolclass=sa.pool.NullPool)
    with admin.connect() as c: c.exec_driver_sql(f'CREATE DATABASE {name}')
    yield pg['url'].rsplit('/', 1)[0] + f'/{name}'
    with admin.connect() as c: c.exec_driver_sql(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
    admin.dispose()


def test_pg_round_trip(pg_url):
    with PredictionLog(pg_url, batch_size=2, flush_ms=10) as plog:
        assert plog.engine.dialect.name == 'postgresql'
        cols = {c['name']: str(c['type']) for c in sa.inspect(plog.engine).get_columns('predictions')}
        assert cols['ts'] == 'TIMESTAMP' and sa.inspect(plog.engine).get_columns('predictions')[2]['type'].timezone
        rows = [row('a1', 0), row('a1', 0, variant='challenger', shadow=True, model_tag='churn:v2', prediction=0),
                row('a2', 1, variant='challenger', model_tag='churn:v2'), row('a3', 2, proba=None, entity=None)]
        plog.log(rows)
        plog.log([row('a1', 0, prediction=0)]) # the same request again: skipped
        plog.flush(timeout=30)
        assert plog.stats()['failed_batches'] == 0 and plog.count() == 4
        df = plog.read()
        assert df.request_id.tolist() == ['a1', 'a1', 'a2', 'a3']
        assert df.ts.tolist() == [T0, T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)] and str(df.ts.dt.tz) == 'UTC'
        assert (df.variant.tolist(), df.shadow.tolist()) == (['champion', 'challenger', 'challenger', 'champion'], [False, True, False, False])
        assert df.prediction.tolist() == [0, 0, 1, 0] and df.proba_1.tolist()[:3] == [0.75] * 3 and pd.isna(df.proba_1[3])
        assert df[FEATURES + ['plan']].to_dict('records') == [{**r['features']} for r in rows]
        assert df.entity.tolist()[:3] == ['c0', 'c0', 'c1'] and df.entity[3] is None
        assert plog.count(since=T0 + timedelta(minutes=1)) == 2 and plog.count(until=T0 + timedelta(minutes=1)) == 2
        assert plog.count('2024-05-01', '2024-05-01') == 4 and plog.count('2024-05-02') == 0
        chunks = list(plog.read(chunksize=3))
        assert [len(c) for c in chunks] == [3, 1]
        assert pd.concat(chunks, ignore_index=True).request_id.tolist() == df.request_id.tolist()


def test_pg_feedback(pg_url):
    with PredictionLog(pg_url) as plog:
        plog.log([row('a1', 0), row('a1', 0, variant='challenger', shadow=True), row('a2', 1)])
        res = plog.feedback([dict(request_id='a1', label=1), dict(request_id='a2', label='churned'), dict(request_id='x9', label=0)])
        assert res == dict(joined=['a1', 'a2'], unknown=['x9'])
        df = plog.read(with_features=False)
        assert df.label.tolist() == [1, 1, 'churned']
        assert df.label_at.notna().all() and str(df.label_at.dt.tz) == 'UTC'
        assert abs(df.label_at[0] - pd.Timestamp.now(tz='UTC')) < pd.Timedelta(minutes=1)
        with pytest.raises(LabelConflict, match="'a2'; a label is written once"): plog.feedback([dict(request_id='a2', label=0)])
        assert plog.read(with_features=False).label.tolist() == [1, 1, 'churned']
        assert plog.feedback([dict(request_id='a2', label=0)], overwrite=True)['joined'] == ['a2'] # a correction replaces the label
        assert plog.read(with_features=False).label.tolist() == [1, 1, 0]
        with pytest.raises(PredictionLogError, match='label cannot be stored as JSON'): plog.feedback([dict(request_id='a1', label=object())])


def test_pg_claims(pg_url):
    "Request ids claimed on PostgreSQL: all or none, one winner when two logs claim at once"
    with PredictionLog(pg_url) as plog, PredictionLog(pg_url) as other:
        plog.log([row('c0', 0)]); plog.flush()
        assert plog.claim(['c1', 'c2']) == [] and other.claim(['c3', 'c1']) == ['c1'] and plog.claim(['c0']) == ['c0']
        assert other.claim(['c3']) == []
        other.release(['c3'])
        with ThreadPoolExecutor(8) as ex: got = list(ex.map(lambda k: (plog if k % 2 else other).claim([f'race{k // 2}']), range(40)))
        assert sorted(map(len, got)) == [0] * 20 + [1] * 20


def test_pg_export_parquet(pg_url, tmp_path):
    with PredictionLog(pg_url) as plog:
        plog.log([row(f'r{i}', i * 60 * 7) for i in range(12)]) # every 7 hours: 4 days
        plog.feedback([dict(request_id=f'r{i}', label=i % 2, source='crm') for i in range(0, 12, 3)])
        files = plog.export_parquet(tmp_path/'out')
        assert [p.parent.name for p in files] == ['date=2024-05-01', 'date=2024-05-02', 'date=2024-05-03', 'date=2024-05-04']
        assert all(re.fullmatch(r'part-000000-240000-0000\.parquet', p.name) for p in files)
        assert len({pq.read_schema(p).to_string() for p in files}) == 1
        back = pd.read_parquet(tmp_path/'out')
        want = plog.read()
        assert back.date.astype(str).tolist() == want.ts.dt.strftime('%Y-%m-%d').tolist()
        pd.testing.assert_frame_equal(back.drop(columns='date')[want.columns].reset_index(drop=True), want,
                                      check_dtype=False, check_index_type=False)
        assert plog.export_parquet(tmp_path/'out') == files # the same window again replaces its files
        assert len(pd.read_parquet(tmp_path/'out')) == 12
        part = plog.export_parquet(tmp_path/'part', since='2024-05-02T06:00', until='2024-05-02')
        assert [str(p.relative_to(tmp_path/'part')) for p in part] == ['date=2024-05-02/part-060000-240000-0000.parquet']


def test_pg_concurrent_processes(pg_url):
    procs = start_workers(pg_url, 4, 2_000, 100, 20, ['close', 'sigterm', 'close', 'sigterm'])
    try:
        for p in procs: wait_line(p, 'logged')
        for p in procs[1::2]: p.send_signal(signal.SIGTERM)
        assert [p.wait(120) for p in procs] == [0] * 4, [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    with PredictionLog(pg_url) as plog:
        assert plog.count() == 8_000
        assert plog.read(with_features=False).request_id.nunique() == 8_000


def test_pg_server_restart(pg, pg_url):
    "The database goes away: log() keeps answering, batches fail and stay queued, and are written once it is back"
    plog = PredictionLog(pg_url, batch_size=50, flush_ms=10)
    try:
        plog.log([row(f'a{i}', i) for i in range(100)])
        plog.flush(timeout=30)
        pg['stop']()
        t = time.perf_counter()
        for i in range(500): plog.log([row(f'b{i}', i)])
        assert time.perf_counter() - t < 2
        deadline = time.monotonic() + 30
        while plog.stats()['failed_batches'] == 0 and time.monotonic() < deadline: time.sleep(0.05)
        assert plog.stats()['failed_batches'] >= 1 and plog.stats()['queued'] > 0
        with pytest.raises(PredictionLogError, match='rows still queued after 0.2 s'): plog.flush(timeout=0.2)
    finally:
        if not (pg['data']/'postmaster.pid').exists(): pg['start']()
    plog.flush(timeout=60)
    plog.close()
    s = plog.stats()
    assert (s['written'], s['dropped'], s['queued']) == (600, 0, 0)
    with PredictionLog(pg_url) as again: assert again.count() == 600
