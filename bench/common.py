"""Helpers the benchmarks share: peak memory of a piece of work, measured in a forked child of its own."""
import multiprocessing, threading

import psutil


class PeakRSS:
    "Peak resident memory above the level at start, sampled every 5 ms"
    def __enter__(self):
        self.proc = psutil.Process() # this process (a forked child measures itself)
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        def sample():
            while not self.stop.wait(0.005): self.peak = max(self.peak, self.proc.memory_info().rss)
        self.th = threading.Thread(target=sample, daemon=True); self.th.start()
        return self
    def __exit__(self, *a):
        self.stop.set(); self.th.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
    @property
    def mb(self): return (self.peak - self.base) / 2**20


def in_child(f, *args):
    "Run f(*args) in a forked child; returns (its result, its peak resident memory above its start in MB)"
    def target(conn):
        with PeakRSS() as m: res = f(*args)
        conn.send((res, m.mb)); conn.close()
    parent, child = multiprocessing.Pipe()
    p = multiprocessing.get_context('fork').Process(target=target, args=(child,)); p.start()
    res = parent.recv(); p.join()
    return res
