"""`make demo` end to end: `mlkit demo` (the Makefile's recipe) in a scratch copy of the project, the way a new user sees it:
a poisoned batch refused naming its checks, `mlkit schedule --once` running a due monitoring job, and the notifications
a local webhook receiver got. Minutes, so not in `make test`: `make test-demo`."""
import os, re, subprocess, sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # conftest of tests/

from conftest import BIN, ROOT
from mlkit.config import load_settings
from mlkit.jobs import scratch_project
from mlkit.registry import Registry

pytestmark = pytest.mark.skipif(not os.environ.get('MLKIT_DEMO_TEST'), reason='the whole tour takes minutes: `make test-demo`')


@pytest.fixture(scope='module')
def tour(tmp_path_factory):
    ini = scratch_project(ROOT/'settings.ini', tmp_path_factory.mktemp('demo'))
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')} | {'BENTOML_DO_NOT_TRACK': 'True'}
    r = subprocess.run([str(BIN/'mlkit'), '-s', str(ini), 'demo'], cwd=ini.parent, env=env, capture_output=True, text=True, timeout=1500)
    (ini.parent/'demo.log').write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert 'Traceback' not in r.stdout + r.stderr, (r.stdout + r.stderr)[-4000:]
    return ini, r.stdout


def test_the_makefile_runs_this_command():
    recipe = re.search(r'(?m)^demo:.*\n((?:\t.*\n)+)', (ROOT/'Makefile').read_text()).group(1)
    assert recipe.strip() == '$(BIN)/mlkit demo', recipe


def test_a_poisoned_batch_is_refused_naming_the_check(tour):
    ini, out = tour
    m = re.search(r'retraining run (\S+) on demo-poisoned\.parquet: (\w+); failed check\(s\): (.*)', out)
    assert m and m.group(2) == 'reject' and 'label_noise' in m.group(3), out[-4000:]
    with Registry.from_settings(load_settings(ini, env={})) as reg:
        run = reg.get_run(m.group(1))
        assert run['decision'] == 'reject' and run['model_tag'] != reg.champion()['tag'], run


def test_schedule_once_runs_the_due_monitoring_job(tour):
    ini, out = tour
    part = out[out.index('== mlkit schedule --once'):]
    started = re.search(r'monitor \S+ \S+ UTC: run (\S+) started', part)
    assert started and re.search(r'monitor \S+ \S+ UTC: succeeded: verdict (ok|warn|retrain)', part) and 'exit status 0' in part, part[:3000]
    with Registry.from_settings(load_settings(ini, env={})) as reg:
        run = reg.get_run(started.group(1))
    assert (run['kind'], run['trigger'], run['status']) == ('monitor', 'schedule', 'succeeded'), run


def test_the_local_receiver_printed_the_notifications(tour):
    _, out = tour
    got = re.search(r'== notifications: the receiver got (\d+): (.*)', out)
    assert got, out[-3000:]
    events = got.group(2).split(', ')
    assert int(got.group(1)) == len(events) == out.count('  [webhook] ') and {'promotion', 'refused'} <= set(events), got.group(0)
    assert re.search(r'\[webhook\] mlkit mlkit-demo: retrain refused \(retrain run \S+\): check ', out), out[-3000:]
