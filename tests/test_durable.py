"kill -9 of a worker under load: every prediction the service answered with 200 is in the prediction log (`[serve] log_durable`)"
import signal, threading, time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from anydata import write_project
from service_util import Server
from mlkit.config import load_settings
from mlkit.predlog import PredictionLog
import mlkit.logread  # noqa: F401  adds PredictionLog.read
from mlkit.retrain import run_steps
from mlkit.service import frame_to_records

N = 2000


def workers(srv):
    "The BentoML worker processes of a server (the processes that load the models and answer /predict)"
    return [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if 'worker' in ' '.join(p.cmdline())]


def test_kill_9_of_a_worker_loses_no_answered_prediction(tmp_path):
    ini, df = write_project(tmp_path, 'diabetes')
    run_steps(str(ini))
    recs = frame_to_records(df.drop(columns=['progression', 'event_time']).head(100))
    srv = Server(ini, workers=2).start()
    answered, refused, killed = [], [], threading.Event()
    def client(k):
        with httpx.Client(timeout=60) as c:
            for j in range(k, N, 16):
                rid = f'kill-{j}'
                try: r = c.post(f'{srv.url}/predict', json={'records': [dict(recs[j % 100], request_id=rid)]})
                except httpx.HTTPError: refused.append(rid); continue  # the connection died with the worker: not answered
                (answered if r.status_code == 200 else refused).append((rid, killed.is_set()))
    def killer():
        while len(answered) < N // 4: time.sleep(0.01)
        victim = workers(srv)[0]
        victim.send_signal(signal.SIGKILL)
        killed.set()
    try:
        with ThreadPoolExecutor(17) as ex:
            kill = ex.submit(killer)
            list(ex.map(client, range(16)))
            kill.result(timeout=5)
    finally: srv.stop()
    assert killed.is_set() and any(after for _, after in answered), "the kill did not happen under load"
    assert len(answered) >= N // 2, (len(answered), refused[:5])
    log = PredictionLog.from_settings(load_settings(ini, env={}))
    stored = set(log.read(with_features=False).request_id)
    missing = [rid for rid, _ in answered if rid not in stored]
    assert not missing, f"{len(missing)} of {len(answered)} answered predictions are not in the log, e.g. {missing[:5]}"
