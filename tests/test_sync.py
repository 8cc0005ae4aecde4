"`make test`'s first gate: the library and README must match the notebooks"
import json, shutil, subprocess
from conftest import BIN, ROOT

COPY = ['nbs', 'mlkit', 'README.md', 'pyproject.toml', 'Makefile', 'settings.ini', 'constraints.txt']


def scratch(tmp_path):
    for name in COPY:
        src = ROOT/name
        if src.is_dir(): shutil.copytree(src, tmp_path/name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
        else: shutil.copy2(src, tmp_path/name)
    return tmp_path


def make(target, cwd):
    return subprocess.run(['make', '--no-print-directory', target, f'VENV={BIN.parent}'], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_in_sync_copy_passes(tmp_path):
    r = make('sync-check', scratch(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_edit_without_export_fails_with_sync_message(tmp_path):
    repo = scratch(tmp_path)
    nb_path = repo/'nbs'/'01_config.ipynb'
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if c['cell_type'] == 'code' and ''.join(c['source']).startswith('#| export')
                and 'def parse_value' in ''.join(c['source']))
    cell['source'] = ''.join(cell['source']).replace('text = text.strip()', 'text = text.strip()  # edited').splitlines(True)
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    r = make('export-check', repo)
    assert r.returncode != 0
    assert 'notebooks and library are out of sync: edit nbs/, run nbdev-export' in r.stderr
    assert 'mlkit/config.py' in r.stderr


def test_readme_edit_without_regeneration_fails(tmp_path):
    repo = scratch(tmp_path)
    (repo/'README.md').write_text((repo/'README.md').read_text() + '\nhand edit\n')
    r = make('export-check', repo)
    assert r.returncode != 0
    assert 'out of sync' in r.stderr
