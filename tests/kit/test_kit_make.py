"""`mlkit new` as a user runs it, for a binary, a multiclass and a regression table: the new project's own `make test` and
`make demo` pass on its own data, in its own venv. Minutes, so not in `make test`: `make test-kit`."""
import os, re, subprocess, sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # conftest and anydata of tests/

from conftest import BIN, ROOT
from anydata import CASES

pytestmark = pytest.mark.skipif(not os.environ.get('MLKIT_KIT_TEST'), reason='three new projects with their own venvs take minutes: `make test-kit`')


def run(argv, cwd, timeout=1800):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('MLKIT_', 'VIRTUAL_ENV', 'PYTHONPATH'))}
    env.update(BENTOML_DO_NOT_TRACK='True', PATH=os.pathsep.join(p for p in env.get('PATH', '').split(os.pathsep) if not p.startswith(str(ROOT))))
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('name', list(CASES))
def test_a_new_project_passes_its_own_make_test_and_make_demo(name, tmp_path):
    make, target, task = CASES[name][:3]
    make().to_parquet(tmp_path/'table.parquet')
    r = run([BIN/'mlkit', 'new', tmp_path/name, '--data', tmp_path/'table.parquet', '--target', target], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'task: {task}' in r.stdout
    project = tmp_path/name
    r = run(['make', 'test'], cwd=project)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    assert re.search(r'\b2 passed\b', r.stdout), r.stdout[-2000:]
    assert (project/'.venv'/'bin'/'mlkit').is_file()  # its own venv, made by its own Makefile
    r = run(['make', 'demo'], cwd=project)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    out = r.stdout
    assert '== retraining job' in out and re.search(r'champion \S+:\S+', out), out[-3000:]
    assert re.search(r'300 answered by', out) and 'feedback 200' in out, out[-3000:]
    assert re.search(r'^(ok|warn|retrain): ', out, re.M) and 'report: ' in out, out[-3000:]
