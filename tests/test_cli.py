"The `mlkit` console script, run as a user runs it"
import subprocess
from conftest import BIN, ROOT


def mlkit(*args, cwd, env=None):
    import os
    e = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    e.update(env or {})
    return subprocess.run([str(BIN/'mlkit'), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command(tmp_path):
    r = mlkit('--help', cwd=tmp_path)
    assert r.returncode == 0
    for name in ['retrain', 'runs', 'models', 'promote', 'rollback', 'serve', 'build', 'monitor', 'schedule', 'demo', 'new', 'config']:
        assert f"\n  {name} " in r.stdout, name


def test_config_shows_sources(project):
    r = mlkit('config', cwd=project, env={'MLKIT_SERVE_PORT': '8123'})
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.split()[:2] == ['serve', 'port'])
    assert line.split()[2] == '8123' and 'environment MLKIT_SERVE_PORT' in line
    line = next(l for l in r.stdout.splitlines() if l.split()[:2] == ['data', 'target'])
    assert 'settings.ini line' in line


def test_config_found_from_a_subfolder(project):
    (project/'sub').mkdir()
    r = mlkit('config', '--json', cwd=project/'sub')
    assert r.returncode == 0, r.stderr
    assert str(project/'settings.ini') in r.stdout


def test_malformed_settings_exit_1_with_message(project):
    ini = project/'settings.ini'
    cases = {
        'tolerance = 0.01': ('tolerance = abc', "[gate] tolerance: expected a number, got 'abc'"),
        'target = churned': ('', "[data]: missing key 'target'"),
        '[schedule]': ('[schedul]', "missing section [schedule]"),
        'port = 3000': ('prot = 3000', "unknown key (did you mean 'port'?)"),
    }
    original = ini.read_text()
    for old, (new, message) in cases.items():
        ini.write_text(original.replace(old, new))
        r = mlkit('config', cwd=project)
        assert r.returncode == 1, (old, r.stdout)
        assert message in r.stderr, (message, r.stderr)
        assert 'Traceback' not in r.stderr
        assert str(ini) in r.stderr


def test_missing_settings_file(tmp_path):
    r = mlkit('config', cwd=tmp_path)
    assert r.returncode == 1
    assert 'no settings.ini in' in r.stderr


def test_new_names_bad_input_and_writes_nothing(project, tmp_path):
    for args, message in [(['--data', 'nope.csv', '--target', 'y'], 'nope.csv'),
                          (['--data', str(tmp_path/'t.csv'), '--target', 'churn'], "target 'churn' is not a column of the data; did you mean 'churned'?")]:
        (tmp_path/'t.csv').write_text('churned,x\n' + ''.join(f'{i % 2},{i}\n' for i in range(200)))
        r = mlkit('new', str(tmp_path/'p'), *args, cwd=project)
        assert r.returncode == 1 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert not (tmp_path/'p').exists()


def test_closed_pipe_is_quiet(project):
    "`mlkit config | head -1`: the reader leaves early; mlkit stops with 141 (as SIGPIPE would) and no traceback"
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_')}
    for args in (['config', '--explain'], ['runs'], ['models', '--json']):
        p = subprocess.Popen([str(BIN/'mlkit'), *args], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # before mlkit writes anything: its first write meets a closed pipe
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 141, (args, err)
        assert 'BrokenPipeError' not in err and 'Traceback' not in err, (args, err)


def test_retrain_param_value_whole_and_typed(project):
    "`-p NAME VALUE` keeps the value whole; a bad one is one line on stderr and a failed run, not a traceback"
    r = mlkit('retrain', '-p', 'hyperparameters', 'notjson', cwd=project)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("mlkit retrain: job parameter 'hyperparameters': expected JSON, got 'notjson'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
    r = mlkit('runs', '--json', cwd=project)
    import json
    runs = json.loads(r.stdout)
    assert [x['status'] for x in runs] == ['failed'] and 'hyperparameters' in runs[0]['reason'], runs
