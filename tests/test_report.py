"`mlkit monitor` end to end: papermill runs the job notebook, report.html renders in headless Chromium"
import io, json, os, re, subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from browser import Browser
from conftest import BIN, ROOT
from mlkit import datasets
from mlkit.config import load_settings
from mlkit.jobs import scratch_project
from mlkit.simulate import log_traffic
from mlkit.registry import Registry
from mlkit.retrain import run_steps


def mlkit(*args, ini, timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'}
    env['MLKIT_SETTINGS'] = str(ini)
    return subprocess.run([str(BIN/'mlkit'), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(ini).parent)


@pytest.fixture(scope='module')
def monitored(tmp_path_factory):
    "A drifted day with a second model answering in A/B, monitored by `mlkit monitor`"
    ini = scratch_project(ROOT/'settings.ini', tmp_path_factory.mktemp('report'))
    first = run_steps(str(ini))['model_tag']
    second = run_steps(str(ini), model='random_forest', force=True)['model_tag']
    s = load_settings(ini, env={})
    reg = Registry.from_settings(s)
    if reg.champion()['tag'] != first: reg.rollback(None, 'the first model answers as the champion')
    t0 = datetime(2026, 2, 3, tzinfo=timezone.utc)
    df = datasets.churn_day(3, n=3000, seed=9, drift={'shift': {'monthly_charges': 25}})
    ts = t0 + pd.to_timedelta(np.linspace(0, 86_000, len(df)), unit='s')
    half = np.random.default_rng(0).random(len(df)) < 0.8
    log_traffic(s, df[half], ts=ts[half], tag=first, label_share=0.3)
    log_traffic(s, df[~half], ts=ts[~half], variant='challenger', tag=second, label_share=0.3)
    res = mlkit('monitor', '--since', '2026-02-03', '--until', '2026-02-03', ini=ini)
    run = reg.list_runs(1, kind='monitor')[0]
    return dict(res=res, settings=s, run=run, dir=s.state_dir/'runs'/run['id'])


def test_cli_prints_the_verdict_and_exits_with_its_status(monitored):
    res, run = monitored['res'], monitored['run']
    assert res.returncode == 5, res.stderr  # retrain
    first = res.stdout.strip().splitlines()[0]
    assert first.startswith('retrain: ') and 'monthly_charges' in first, res.stdout
    assert f"report: {monitored['dir']/'report.html'}" in res.stdout
    assert run['status'] == 'succeeded' and run['decision'] == 'retrain'
    summary = json.loads((monitored['dir']/'summary.json').read_text())
    assert summary['exit_status'] == 5 and summary['rows'] == 3000
    assert summary['ab']['challenger']['n'] > 0 and summary['ab']['recommendation'] in ('promote_challenger', 'keep_champion', 'keep_collecting')
    assert (monitored['dir']/'monitor.ipynb').is_file()


def test_report_has_no_code_and_loads_nothing(monitored):
    html = (monitored['dir']/'report.html').read_text()
    assert 'M.measure_drift' not in html and 'import pandas' not in html  # code cells are left out
    assert 'Feature drift' in html and 'Quality with delayed labels' in html and 'Verdict' in html
    assert '<script src=' not in html and 'cdnjs' not in html
    images = re.findall(r'<img[^>]*src="data:image/png;base64,', html)
    assert len(images) == 7, len(images)  # distributions, drift over time, scores, quality, A/B, the always-valid A/B interval, latency: each once


def test_report_renders_in_chromium_with_its_plots(monitored):
    url = (monitored['dir']/'report.html').as_uri()
    with Browser() as b:
        b.open(url)
        images = b.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        text = b.evaluate("document.body.innerText")
        png = b.screenshot()
        errors = b.errors()
    assert errors == []
    assert len(images) == 7 and all(ok and w > 100 and h > 100 for ok, w, h in images), images
    assert 'RETRAIN' in text and 'monthly_charges' in text
    px = imread(io.BytesIO(png))[..., :3]
    assert px.shape[0] > 1000 and px.shape[1] >= 1000
    ink = (px.reshape(-1, 3) < 0.9).any(axis=1).mean()  # share of pixels that are not white
    colors = len(np.unique((px.reshape(-1, 3) * 255).astype(np.uint8), axis=0))
    assert ink > 0.03 and colors > 100, (ink, colors)


def test_a_failed_run_keeps_its_notebook_and_report(tmp_path):
    ini = scratch_project(ROOT/'settings.ini', tmp_path)
    res = mlkit('monitor', ini=ini)  # no champion yet
    assert res.returncode == 1
    assert 'no champion in the registry' in res.stderr
    reg = Registry.from_settings(load_settings(ini, env={}))
    (run,) = reg.list_runs(5, kind='monitor')
    assert run['status'] == 'failed' and 'no champion' in run['reason']
    d = load_settings(ini, env={}).state_dir/'runs'/run['id']
    assert (d/'monitor.ipynb').is_file() and 'no champion in the registry' in (d/'report.html').read_text()
