"""What the gatekeeper's caps on keys per record and per request ([serve] max_record_keys, max_fields) cost and save.

In-process, parse + validate /predict bodies the way the gatekeeper does (json.loads, then validate_payload against a
contract inferred from the four-class table of tests/anydata.py), caps at their defaults beside caps off:
  normal: 1,000 records with the contract's columns
  wide:   55 records with 10,000 extra keys each (about 8 MB)
Then against two real `mlkit serve` (one worker each) of a model trained on that table, one with the caps at their
defaults and one with them off: the wide body three times, its answer, its time and the worker's memory after.
Target: the caps cost normal traffic under 5 %; the wide body is refused (413) in a small fraction of the time it costs
uncapped, and leaves the worker's memory where it was.
"""
import json, os, sys, tempfile, time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tests'))
from anydata import four_classes  # noqa: E402
from mlkit.contract import infer_contract  # noqa: E402
from mlkit.gatekeeper import validate_payload  # noqa: E402
from mlkit.service import frame_to_records  # noqa: E402
from service_util import Server  # noqa: E402

OFF = 10**12  # a cap no body reaches


def timed(body:bytes, contract:dict, cap:int, reps:int)->tuple[float, object]:
    "Median seconds of parse + validate over `reps`, and the last answer (None: valid)"
    times, res = [], None
    for _ in range(reps):
        t = time.perf_counter()
        res = validate_payload(json.loads(body), contract, max_records=1000, max_record_keys=cap, max_fields=cap)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], res


def main():
    df = four_classes(2000, 0)
    contract = infer_contract(df, 'segment', 'classification', id_column='row_id', timestamp_column='event_time')
    recs = frame_to_records(df.drop(columns=['segment', 'event_time']))
    normal = json.dumps({'records': recs[:1000]}).encode()
    wide = json.dumps({'records': [dict(r, **{f'x{k}': k for k in range(10_000)}) for r in recs[:55]]}).encode()
    load = os.getloadavg()
    rss = psutil.Process().memory_info().rss
    n_on, ok_on = timed(normal, contract, 0, 21)
    n_off, ok_off = timed(normal, contract, OFF, 21)
    w_on, w_res = timed(wide, contract, 0, 5)
    w_off, w_off_res = timed(wide, contract, OFF, 5)
    assert ok_on is None and ok_off is None, (ok_on, ok_off)
    print(f"parse + validate, median per request, {os.cpu_count()}-core machine, load average {' '.join(f'{x:.2f}' for x in load)}; "
          f"process RSS {rss / 2**20:.0f} MB at start, {psutil.Process().memory_info().rss / 2**20:.0f} MB at the end")
    print(f"normal ({len(normal) / 1e6:.2f} MB, 1,000 records): caps on {n_on * 1000:.1f} ms, caps off {n_off * 1000:.1f} ms "
          f"({n_on / n_off - 1:+.1%}; target < +5%)")
    print(f"wide ({len(wide) / 1e6:.2f} MB, 55 records x 10,000 extra keys): caps on {w_on * 1000:.0f} ms -> {w_res[0]}, "
          f"caps off {w_off * 1000:.0f} ms -> {w_off_res[0] if w_off_res else 200}; the caps take {w_on / w_off:.1%} of the uncapped time "
          f"(the JSON parse, before any cap, is most of what is left)")

    served(wide)


def served(wide:bytes):
    "The wide body against real servers, caps on and off"
    import httpx
    from anydata import write_project
    from mlkit.retrain import run_steps
    ini, _ = write_project(Path(tempfile.mkdtemp(prefix='bench-gatekeeper-')), 'four_classes')
    run_steps(str(ini))
    off = {'MLKIT_SERVE_MAX_RECORD_KEYS': str(OFF), 'MLKIT_SERVE_MAX_FIELDS': str(OFF), 'MLKIT_SERVE_MAX_BODY_MB': '64'}
    worker_mb = lambda srv: sum(p.memory_info().rss for p in psutil.Process(srv.proc.pid).children(recursive=True)
                                if 'worker' in ' '.join(p.cmdline())) / 2**20
    for name, env in (('caps on', {'MLKIT_SERVE_MAX_BODY_MB': '64'}), ('caps off', off)):
        with Server(ini, env=env) as srv:
            before, times, codes = worker_mb(srv), [], []
            for _ in range(3):
                t = time.perf_counter()
                r = httpx.post(f'{srv.url}/predict', content=wide, headers={'Content-Type': 'application/json'}, timeout=300)
                times.append(time.perf_counter() - t); codes.append(r.status_code)
            print(f"served, {name}: wide body answered {codes} in {', '.join(f'{x:.2f}' for x in times)} s; "
                  f"worker memory {before:.0f} MB before, {worker_mb(srv):.0f} MB after")


if __name__ == '__main__':
    main()
