"""What papermill adds to the retraining job.

Runs the retraining job on the embedded data set, each run in a fresh scratch project and a fresh process, so both
pay the same start-up and library imports:
  baseline: a plain Python process that calls the job's steps as functions (mlkit.retrain.run_steps)
  mlkit:    `mlkit retrain`, which executes the job notebook with papermill into runs/<run-id>/
and prints the best wall time of each and their difference. Target: papermill's overhead under 3 s.
"""
import os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REPEAT = int(os.environ.get('BENCH_REPEAT', 3))
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith('MLKIT_') and k != 'IN_TEST'},
       'MLKIT_SCHEDULE_MIN_RETRAIN_INTERVAL_HOURS': '0'}

from mlkit.jobs import scratch_project


def timed(cmd, ini):
    t = time.perf_counter()
    subprocess.run(cmd, env={**ENV, 'MLKIT_SETTINGS': str(ini)}, check=True, capture_output=True, cwd=ini.parent)
    return time.perf_counter() - t


def main():
    tmp = Path(tempfile.mkdtemp(prefix='mlkit-bench-'))
    steps, job = [], []
    for i in range(REPEAT):
        a, b = scratch_project(ROOT/'settings.ini', tmp/f'steps{i}'), scratch_project(ROOT/'settings.ini', tmp/f'job{i}')
        steps.append(timed([sys.executable, '-c', f"from mlkit.retrain import run_steps; run_steps({str(a)!r})"], a))
        job.append(timed([str(BIN/'mlkit'), 'retrain'], b))
    best_s, best_j = min(steps), min(job)
    print(f"retraining job on builtin:churn, fresh process and project each run, best of {REPEAT}")
    print(f"  all runs: steps {', '.join(f'{t:.2f}' for t in steps)} s; papermill {', '.join(f'{t:.2f}' for t in job)} s")
    print(f"  {'baseline: python process calling the steps':<46} {best_s:7.2f} s")
    print(f"  {'mlkit retrain: papermill job notebook':<46} {best_j:7.2f} s")
    over = best_j - best_s
    print(f"  {'papermill overhead':<46} {over:7.2f} s   (target < 3 s: {'met' if over < 3 else 'NOT met'})")


if __name__ == '__main__':
    main()
