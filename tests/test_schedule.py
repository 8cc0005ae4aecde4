"`mlkit schedule`: real scheduler processes on a scratch project, running the real jobs with papermill"
import os, re, signal, subprocess, time
from datetime import timedelta

import pytest

from conftest import BIN, ROOT
from mlkit.config import load_settings
from mlkit.db import utcnow
from mlkit.jobs import scratch_project
from mlkit.registry import Registry
from mlkit.schedule import FireBook, latest_fire


def project(tmp_path, **schedule):
    "A scratch project whose [schedule] keys are set to `schedule`"
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    text = ini.read_text()
    for k, v in schedule.items():
        text, n = re.subn(rf'(?m)^{k}\s*=.*$', f'{k} = {v}', text)
        if not n: text = text.replace('[schedule]\n', f'[schedule]\n{k} = {v}\n')
    ini.write_text(text)
    return ini


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    e.update(BENTOML_DO_NOT_TRACK='True', PYTHONUNBUFFERED='1')
    return e


def scheduler(ini, *args):
    return subprocess.Popen([str(BIN/'mlkit'), 'schedule', *args], cwd=ini.parent, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def scheduled_runs(ini, kind='retrain'):
    with Registry.from_settings(load_settings(ini, env={})) as reg:
        return [r for r in reg.list_runs(100) if r['kind'] == kind and r['trigger'] == 'schedule']


def test_two_concurrent_schedulers_run_a_due_job_once(tmp_path):
    ini = project(tmp_path, retrain='* * * * *', monitor='')
    a, b = scheduler(ini, '--once'), scheduler(ini, '--once')
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    assert [a.returncode, b.returncode] == [0, 0], outs
    runs = scheduled_runs(ini)
    assert len(runs) == 1 and runs[0]['status'] == 'succeeded', (runs, outs)
    assert sum('started' in o for o in outs) == 1, outs
    other = next(o for o in outs if 'started' not in o)  # it lost the claim, or came after the fire was claimed: nothing due
    assert 'claimed by another scheduler' in other or 'is still running' in other or other.strip().splitlines() == [other.strip().splitlines()[0]], outs
    with FireBook.from_settings(load_settings(ini, env={})) as book: fires = book.fires('retrain')
    assert [f['run_id'] for f in fires if f['outcome'].startswith('succeeded')] == [runs[0]['id']], fires


def test_missed_fires_coalesce_into_one_run_then_nothing_is_due(tmp_path):
    now = utcnow()
    cron = f'{(now.minute + 30) % 60} * * * *'  # hourly, the next fire about half an hour away: no fire comes due during the test
    ini = project(tmp_path, retrain=cron, monitor='')
    with FireBook.from_settings(load_settings(ini, env={})) as book:  # the last scheduler ran three hours ago
        old = latest_fire(cron, now - timedelta(hours=3))
        book.claim('retrain', old, 'an-old-run'); book.finish('retrain', old, 'succeeded: promote')
    r1 = subprocess.run([str(BIN/'mlkit'), 'schedule', '--once', '--job', 'monitor'], cwd=ini.parent, env=env(), capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0 and 'started' not in r1.stdout and "schedule (UTC): nothing: [schedule] monitor is empty" in r1.stdout, r1.stdout
    r = subprocess.run([str(BIN/'mlkit'), 'schedule', '--once'], cwd=ini.parent, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '(and 2 missed fire(s), coalesced)' in r.stdout, r.stdout
    r2 = subprocess.run([str(BIN/'mlkit'), 'schedule', '--once'], cwd=ini.parent, env=env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and 'started' not in r2.stdout, r2.stdout
    assert len(scheduled_runs(ini)) == 1


def test_a_fire_past_the_grace_period_waits_for_the_next(tmp_path):
    t = utcnow() - timedelta(hours=13)
    ini = project(tmp_path, retrain=f'{t.minute} {t.hour} * * *', monitor='', misfire_grace_hours='12')
    r = subprocess.run([str(BIN/'mlkit'), 'schedule', '--once'], cwd=ini.parent, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'was missed by more than 12 h' in r.stdout and 'next at' in r.stdout, r.stdout
    assert scheduled_runs(ini) == []


def test_bad_cron_expression_is_a_settings_error(tmp_path):
    ini = project(tmp_path, monitor='every hour')
    r = subprocess.run([str(BIN/'mlkit'), 'schedule', '--once'], cwd=ini.parent, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and '[schedule] monitor' in r.stderr and 'cron expression' in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr


def _wait_for(p, text, timeout=300):
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = p.stdout.readline()
        if not line: break
        lines.append(line)
        if text in line: return lines
    raise AssertionError(f"no {text!r} in {''.join(lines)}")


@pytest.mark.parametrize('stop_timeout_s, status', [(300, 'succeeded'), (1, 'failed')])
def test_sigterm_lets_a_running_job_finish_within_the_bound(tmp_path, stop_timeout_s, status):
    ini = project(tmp_path, retrain='* * * * *', monitor='', stop_timeout_s=str(stop_timeout_s))
    p = scheduler(ini)
    _wait_for(p, 'started')
    time.sleep(1)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=stop_timeout_s + 120)[0]
    assert p.returncode == 0, out
    assert 'SIGTERM: stopping' in out and 'next fire' not in out, out
    runs = scheduled_runs(ini)
    assert [r['status'] for r in runs] == [status], (runs, out)
    with FireBook.from_settings(load_settings(ini, env={})) as book: fire = book.fires('retrain')[0]
    assert fire['finished_at'] is not None and fire['outcome'].startswith(status), fire
