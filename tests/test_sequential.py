"Always-valid A/B verdicts: false decisions of hourly reads, power at the minimum effect, sample-ratio mismatch, guardrails, paired shadow tests, and the monitoring step that uses them"
import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import ROOT
from mlkit import monitor
from mlkit.config import load_settings
from mlkit.logwindow import LogWindow, read_log
from mlkit.predlog import PredictionLog
from mlkit.sequential import labels_needed, sequential_ab, sequential_path, simulate_looks, simulated_ab_log

ALPHA, MIN_EFFECT = 0.01, 0.01
SIMS_AA, SIMS_POWER = 200, 100


def noise(rate, sims):
    "Three binomial standard errors of a rate estimated from `sims` experiments: the margin for simulation noise"
    return 3 * np.sqrt(rate * (1 - rate) / sims)


@pytest.mark.parametrize('labels_per_day', [200, 5000])
def test_aa_read_every_hour_for_14_days(labels_per_day):
    # two identical arms, the verdict read at every hour of 14 days (336 looks)
    r = simulate_looks(0.8, 0.8, labels_per_day, days=14, sims=SIMS_AA, alpha=ALPHA, min_effect=MIN_EFFECT, seed=labels_per_day)
    seq, fixed = np.mean(r['sequential'] >= 0), np.mean(r['fixed'] >= 0)
    print(f"A/A, {labels_per_day} labels per arm per day, read hourly: always-valid {seq:.1%}, fixed-horizon {fixed:.1%} false decisions "
          f"({np.mean(r['fixed_at_end']):.1%} read once at the end)")
    assert seq <= ALPHA + noise(ALPHA, SIMS_AA), seq
    assert fixed > ALPHA + noise(ALPHA, SIMS_AA), fixed  # peeking at the fixed-horizon test breaks its alpha


def test_power_at_the_minimum_effect_and_labels_needed():
    # accuracy 0.81 against 0.80, the difference of [monitor] ab_min_effect; 5,000 labels per arm per day make 80 % reachable in 14 days
    r = simulate_looks(0.80, 0.81, 5000, days=14, sims=SIMS_POWER, alpha=ALPHA, min_effect=MIN_EFFECT, seed=2)
    decided = r['sequential'] >= 0
    better, worse = np.mean(decided & (r['sequential_sign'] > 0)), np.mean(decided & (r['sequential_sign'] < 0))
    fixed = labels_needed(0.8 * 0.2, 0.81 * 0.19, 1., MIN_EFFECT, ALPHA)
    used = np.nanmean(r['labels'])
    print(f"difference 0.01: {better:.0%} decide for the better arm, {worse:.0%} for the worse; labels used when deciding {used:,.0f} "
          f"(median {np.nanmedian(r['labels']):,.0f}); fixed-horizon sample size {fixed['fixed_horizon']:,}, "
          f"always-valid estimates {fixed['sequential']:,} (observed difference = min_effect) to {fixed['sequential_at_power']:,} (80 % at one look)")
    assert better >= 0.8 and worse == 0, (better, worse)
    assert used < fixed['fixed_horizon'] < fixed['sequential'] < fixed['sequential_at_power']


def test_the_verdict_reports_labels_needed_next_to_the_fixed_horizon_size():
    log, contract = simulated_ab_log(4000, accuracy=(0.8, 0.81), seed=11)
    v = sequential_ab(log, contract, 'accuracy', ALPHA, MIN_EFFECT, share=0.5)
    n = v['labels_needed']
    assert v['recommendation'] == 'keep_collecting' and not v['stop'], v['detail']
    assert 0 < n['fixed_horizon'] < n['sequential'], n
    # the fixed-horizon size from the arms' own spread: (z_a/2 + z_power)^2 (s_cl^2 + s_ch^2 / k) / delta^2 challenger labels, k champion labels to one
    var = {a: v[a]['se']**2 * v[a]['n'] for a in ('champion', 'challenger')}
    k = v['champion']['n'] / v['challenger']['n']
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(0.8)
    assert n['fixed_horizon'] == pytest.approx((var['challenger'] + var['champion'] / k) * z**2 / MIN_EFFECT**2 * (1 + k), rel=1e-4)
    assert v['fixed_horizon']['test'] == 'two_proportion_z' and v['fixed_horizon']['p_value'] is not None


class Run:
    "What `measure_ab` reads of a monitoring run, and the findings it records"
    def __init__(self, mode='ab', share=0.5, metric='accuracy', contract=None):
        s = load_settings(ROOT/'settings.ini', env={})
        self.settings = dataclasses.replace(s, serve=dataclasses.replace(s.serve, mode=mode, challenger_share=share))
        self.thresholds = monitor.thresholds(self.settings)
        self.metric, self.champion_meta, self.contract, self.until = metric, dict(contract=contract), contract, None
        self.findings, self.notes = [], []

    def add(self, level, kind, subject, detail):
        (self.notes if level == 'note' else self.findings).append((level, kind, subject, detail))


def measure(log, contract, **kw):
    run = Run(contract=contract, **kw)
    res = monitor.measure_ab(run, LogWindow(log, pd.DataFrame(index=log.index), None, None))
    return run, res


def promoted(run):
    return [f for f in run.findings if 'mlkit promote' in f[3]]


def test_a_routing_bug_dropping_5_percent_of_one_arm_is_caught_and_blocks_promotion():
    log, contract = simulated_ab_log(40000, accuracy=(0.80, 0.85), share=0.5, seed=12)
    run, ok = measure(log, contract)
    assert ok['recommendation'] == 'promote_challenger' and promoted(run), ok['detail']  # the challenger would be promoted
    lost = log.drop(log[log['variant'] == 'challenger'].sample(frac=0.05, random_state=1).index)
    run, res = measure(lost, contract)
    assert res['srm']['mismatch'] and res['srm']['p_value'] < 0.001, res['srm']
    assert res['recommendation'] == 'blocked' and not promoted(run), res['detail']
    warn = [f for f in run.findings if f[0] == 'warn' and f[2] == 'sample_ratio']
    assert warn and '48.' in warn[0][3] and '50.00%' in warn[0][3], run.findings  # names the observed and the configured share


def test_canary_without_a_recorded_share_skips_the_sample_ratio_check_with_a_note():
    log, contract = simulated_ab_log(4000, share=0.2, seed=13)
    run, res = measure(log, contract, mode='canary', share=0.05)
    assert not res['srm']['checked'] and any('sample ratio not checked' in n[3] for n in run.notes), run.notes
    res = sequential_ab(log.assign(share=0.2), contract, 'accuracy', mode='canary')
    assert res['srm']['checked'] and not res['srm']['mismatch'], res['srm']


def test_a_faster_learner_three_times_slower_at_p99_is_not_recommended():
    log, contract = simulated_ab_log(20000, accuracy=(0.80, 0.86), latency=(1, 3), share=0.5, seed=14)
    run, res = measure(log, contract)
    assert res['diff'] > 0 and res['ci_low'] > 0, res['detail']  # better on the primary metric, beyond doubt
    assert res['recommendation'] == 'keep_champion' and not promoted(run), res['detail']
    assert res['blocked_by'] == ['latency_p99_ratio'] and 'latency_p99_ratio' in res['detail'] and '1.5x' in res['detail'], res['detail']


def test_shadow_mode_paired_test_detects_what_the_unpaired_one_does_not():
    # the challenger fixes 12 % of the champion's mistakes and breaks 1 % of its right answers: +1.6 points, on the same requests
    log, contract = simulated_ab_log(6000, accuracy=(0.8,), shadow=True, fixes=0.12, breaks=0.01, seed=15)
    run, res = measure(log, contract, mode='shadow')
    p = res['paired']
    print(f"shadow: {p['pairs']:,} pairs, diff {p['diff']:+.4f}, paired p {p['p_value']:.2g} ({p['test']}), unpaired p {p['p_unpaired']:.2g}, "
          f"always-valid paired p {res['p_value']:.2g}; se ratio {p['se_ratio']:.2f} ({p['labels_factor']:.1f}x the labels)")
    assert res['mode'] == 'shadow' and p['test'] == 'mcnemar_mid_p'
    assert p['p_value'] < ALPHA < p['p_unpaired'], p  # fixed horizon: paired detects, unpaired does not
    unpaired = sequential_path(log[log['shadow'] == (log['variant'] == 'challenger')].assign(shadow=False), contract, 'accuracy', ALPHA, MIN_EFFECT)
    assert res['recommendation'] == 'promote_challenger' and res['ci_low'] > 0, res['detail']  # always valid, paired: decided
    assert unpaired['ci_low'].iloc[-1] < 0 < unpaired['ci_high'].iloc[-1]  # always valid, unpaired: not
    assert p['se_ratio'] > 2 and not res['srm']['checked'] and promoted(run)
    losses = sequential_ab(log, contract, 'log_loss', ALPHA, MIN_EFFECT, mode='shadow')['paired']
    assert losses['test'] == 'paired_t' and losses['se_paired'] < losses['se_unpaired'], losses
    auc = sequential_ab(log, contract, 'roc_auc', ALPHA, MIN_EFFECT, mode='shadow')['paired']  # the project's default primary metric
    print(f"shadow roc_auc: paired p {auc['p_value']:.2g} ({auc['test']}), unpaired p {auc['p_unpaired']:.2g}, se ratio {auc['se_ratio']:.2f}")
    assert auc['test'] == 'delong_paired' and auc['p_value'] < ALPHA < auc['p_unpaired'], auc


def test_an_hourly_window_is_judged_on_the_whole_experiment(tmp_path):
    # two days of an A/B test in a real prediction log; the monitoring run reads only the last hour, the verdict the whole experiment
    log, contract = simulated_ab_log(3000, accuracy=(0.8, 0.9), share=0.5, days=2, seed=16)
    plog = PredictionLog(f"sqlite:///{tmp_path/'log.db'}")
    plog.log([dict(request_id=r.request_id, ts=r.ts.to_pydatetime(), variant=r.variant, model_tag=r.model_tag, features={}, prediction=r.prediction,
                   proba={'0': r.proba_0, '1': r.proba_1}, latency_ms=r.latency_ms) for r in log.itertuples()])
    plog.flush()
    plog.feedback([dict(request_id=r.request_id, label=r.label) for r in log.itertuples() if r.label is not None])
    end = log['ts'].max().ceil('h')
    win = read_log(plog, contract, end - pd.Timedelta(hours=1), end)
    run = Run(contract=contract)
    run.until = end.to_pydatetime()
    whole = monitor.measure_ab(run, win, plog)
    hour = monitor.measure_ab(Run(contract=contract), win)
    labeled = log[log['label'].notna()]
    assert len(win.rows) < 200 and whole['experiment']['rows'] == len(log), whole['experiment']
    assert whole['challenger']['n'] == (labeled['variant'] == 'challenger').sum() > 10 * hour['challenger']['n']
    assert whole['recommendation'] == 'promote_challenger' and hour['recommendation'] == 'keep_collecting', (whole['detail'], hour['detail'])
    assert whole['experiment']['since'] == log['ts'].min().isoformat()
    plog.close()
