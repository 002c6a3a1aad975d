#!/usr/bin/env python3
"""Replication over an emulated WAN (issue 14), driven by scripts/bench-wan.sh.

For each link (rate, round trip, random loss per direction) and each
congestion controller, on loopback through examples/wan_relay:

1. initial copy of a random file (incompressible): time from `protect` to
   `sync` done; link utilisation = payload bytes / (time x link rate).
   Target: >= 90 % (>= 80 % on the 1 Gbit/s link).
2. delta after changing DELTA_PCT % of the 4 KiB blocks (random data):
   time from the end of the writes to `sync` done. Target: <= 2 x ideal +
   2 RTT, where ideal = changed bytes / link rate.
3. continuous RPO under a 4 KiB random-write churn at CHURN_FRAC of the link
   rate (fio, O_DIRECT, through the mount) for RPO_SECS: lag_secs sampled
   every 0.5 s from `vdrep status --json`. Target: p99 <= 2 s (on the
   branch-office link, where the churn exceeds the link, the target is
   graceful degradation: Warning with a reason, nothing lost, see the notes).

UDP bytes are the relay's counters (what really crossed the link), beside
vdrep's payload counter. No assertion on time: the verdict column reports.
"""

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VDREP = os.environ.get("VDREP", str(REPO / "target/release/vdrep"))
RELAY = os.environ.get("RELAY", str(REPO / "target/release/examples/wan_relay"))
ROOT = Path(os.environ.get("BENCH_ROOT", "/var/tmp/vdrep-wanbench"))
# rate_mbit:rtt_ms:loss  (loss per direction, a fraction)
LINKS = os.environ.get(
    "LINKS", "100:50:0 100:50:0.0005 100:50:0.005 1000:20:0.0005 10:150:0").split()
CCS = os.environ.get("CCS", "bbr").split()
# Variants run side by side in one invocation (A/B in the same run): each
# "VAR=VALUE,VAR=VALUE" is added to vdrep's environment; "-" for none.
# E.g. VARIANTS="VDREP_COMMIT_AHEAD=0 -" compares committing after the last
# Ack with committing ahead (the default).
VARIANTS = os.environ.get("VARIANTS", "-").split()
SECTIONS = os.environ.get("SECTIONS", "initial delta rpo").split()
IDEAL_SECS = float(os.environ.get("IDEAL_SECS", "8"))      # initial copy sized to this ideal time
MAX_SIZE = int(os.environ.get("MAX_SIZE_MIB", "512")) << 20
DELTA_PCT = float(os.environ.get("DELTA_PCT", "1"))
RPO_SECS = int(os.environ.get("RPO_SECS", "30"))
RUNS = int(os.environ.get("RUNS", "1"))                     # runs per link; the table shows medians
CHURN_FRAC = float(os.environ.get("CHURN_FRAC", str(1 / 3)))
STAMP = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def say(*a):
    print(f"[wan {time.strftime('%H:%M:%S', time.gmtime())}]", *a, file=sys.stderr, flush=True)


def run(*args, timeout=600, check=True, env=None):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def status(vmdir):
    r = run(VDREP, "status", vmdir, "--json", check=False, timeout=30)
    try:
        return json.loads(r.stdout)["replication"][0]
    except Exception:
        return {}


def cpu_secs(pid):
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except Exception:
        return 0.0


def rcvbuf_errors():
    """UDP datagrams the kernel dropped for full socket receive buffers
    (all sockets of the host: a relay or peer too slow to read)."""
    try:
        lines = [x.split() for x in Path("/proc/net/snmp").read_text().splitlines() if x.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except Exception:
        return 0


def daemon_pid(vmdir):
    """The mount's worker process serving `vmdir` (it runs the sender), from
    `vdrep status --json`. Its supervisor has the same command line (it
    only holds the FUSE connection), so a search by name finds the wrong
    process: the one that uses no CPU."""
    r = run(VDREP, "status", vmdir, "--json", check=False, timeout=30)
    try:
        return int(json.loads(r.stdout)["worker"]["pid"])
    except Exception:
        return None


def pctl(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


class Site:
    """Keys, a receiver, the relay in front of it, and a mounted VM folder."""

    def __init__(self, work, link, cc, seed, variant="-"):
        self.work, self.link, self.cc = work, link, cc
        rate, rtt, loss = link
        shutil.rmtree(work, ignore_errors=True)
        for d in ["ka", "kb", "vm", "store"]:
            (work / d).mkdir(parents=True)
        run(VDREP, "keys", "init", "--name", "site-a", "--out", work / "ka")
        run(VDREP, "keys", "init", "--name", "site-b", "--out", work / "kb")
        env = dict(os.environ, VDREP_CONGESTION=cc)
        if variant != "-":
            env.update(kv.split("=", 1) for kv in variant.split(","))
        self.env = env
        self.rx = subprocess.Popen(
            [VDREP, "receive", "--listen", "127.0.0.1:0", "--store", work / "store", "--keys",
             work / "kb", "--trust", work / "ka/site-a.crt"],
            stdout=subprocess.PIPE, stderr=open(work / "receiver.log", "w"), text=True, env=env)
        line = self.rx.stdout.readline()
        self.rx_addr = line.split()[2]
        self.stats_file = work / "relay-stats.json"
        self.relay = subprocess.Popen(
            [env.get("RELAY_BIN", RELAY), "--listen", "127.0.0.1:0", "--upstream", self.rx_addr, "--rate-mbit", str(rate),
             "--delay-ms", str(rtt / 2), "--loss", str(loss), "--seed", str(seed),
             "--stats-every-secs", "0.5", "--stats-file", self.stats_file],
            stdout=subprocess.PIPE, stderr=open(work / "relay.log", "w"), text=True)
        self.addr = self.relay.stdout.readline().split()[2]
        self.vm = work / "vm"
        self.mounted = False
        self.sender_pid = None

    def mount(self):
        run(VDREP, "mount", self.vm, "--keys", self.work / "ka", "--log-file", self.work / "sender.log",
            env=self.env)
        self.mounted = True

    def protect(self, every, disks):
        run(VDREP, "protect", "vm1", "--to", self.addr, "--trust", self.work / "kb/site-b.crt",
            "--every", every, *[self.vm / d for d in disks], env=self.env)

    def sync(self, timeout=3600):
        run(VDREP, "sync", self.vm, "--timeout", str(timeout), timeout=timeout + 30)

    def udp_bytes(self):
        """(forward, reverse) bytes that left the relay, from its last stats line."""
        try:
            lines = [json.loads(x) for x in self.stats_file.read_text().splitlines() if x.strip()]
            d = {x["dir"]: x for x in lines}
            return d["fwd"]["out_bytes"], d["rev"]["out_bytes"], d["fwd"]["lost_pkts"], d["fwd"]["queue_drop_pkts"]
        except Exception:
            return 0, 0, 0, 0

    def cpu(self):
        """CPU seconds so far of (sender daemon, receiver, relay)."""
        if self.mounted and not self.sender_pid:
            self.sender_pid = daemon_pid(self.vm)
        snd = self.sender_pid if self.mounted else None
        return (cpu_secs(snd) if snd else 0.0, cpu_secs(self.rx.pid), cpu_secs(self.relay.pid))

    def close(self):
        if self.mounted:
            run(VDREP, "umount", self.vm, check=False)
        for p in (self.relay, self.rx):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def random_file(path, size, seed):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(rnd.randbytes(n))
            left -= n


def bench_link(link, cc, results, run_no=0, variant="-"):
    rate, rtt, loss = link
    rate_Bps = rate * 1e6 / 8
    size = min(MAX_SIZE, int(rate_Bps * IDEAL_SECS) // (1 << 20) * (1 << 20))
    size = max(size, 8 << 20)
    label = cc if variant == "-" else f"{cc} {variant}"
    name = f"{rate:g}Mbit-{rtt:g}ms-{loss * 100:g}%-{label.replace(' ', '-').replace(',', '-')}-r{run_no}"
    work = ROOT / f"run-{STAMP}" / name
    say(f"{name}: initial copy of {size >> 20} MiB (ideal {size / rate_Bps:.1f} s)")
    site = Site(work, link, cc, seed=hash(name) & 0xFFFF, variant=variant)
    row = {"link": f"{rate:g} Mbit/s, {rtt:g} ms, {loss * 100:g} % loss", "cc": label,
           "size_mib": size >> 20, "rate_mbit": rate, "rtt_ms": rtt, "loss": loss}
    try:
        random_file(site.vm / "disk.img", size, 7)
        site.mount()
        row["load_initial"] = os.getloadavg()[0]
        c0 = site.cpu()
        k0 = rcvbuf_errors()
        t0 = time.time()
        site.protect("continuous", ["disk.img"])
        site.sync()
        t = time.time() - t0
        c1 = site.cpu()
        row["initial_rcvbuf_drops"] = rcvbuf_errors() - k0
        row.update(initial_cpu_sender=c1[0] - c0[0], initial_cpu_receiver=c1[1] - c0[1],
                   initial_cpu_relay=c1[2] - c0[2])
        udp_fwd, udp_rev, lost, qdrop = site.udp_bytes()
        st = status(site.vm)
        row.update(initial_secs=t, initial_ideal=size / rate_Bps,
                   initial_util=size / t / rate_Bps, initial_udp=udp_fwd,
                   initial_payload=st.get("bytes_sent", 0), initial_lost=lost, initial_qdrop=qdrop)
        say(f"{name}: load {row['load_initial']:.1f}, initial {t:.1f} s, utilisation {row['initial_util'] * 100:.0f} %, "
            f"UDP {udp_fwd / 2**20:.1f} MiB, lost {lost}, queue drops {qdrop}, CPU s sender/receiver/relay "
            f"{row['initial_cpu_sender']:.1f}/{row['initial_cpu_receiver']:.1f}/{row['initial_cpu_relay']:.1f}, "
            f"kernel socket-buffer drops {row['initial_rcvbuf_drops']}")
        if "delta" in SECTIONS:
            blocks = size // 4096
            n = max(1, int(blocks * DELTA_PCT / 100))
            rnd = random.Random(3)
            picks = rnd.sample(range(blocks), n)
            fd = os.open(site.vm / "disk.img", os.O_WRONLY)
            for b in picks:
                os.pwrite(fd, rnd.randbytes(4096), b * 4096)
            os.fsync(fd)
            os.close(fd)
            u0 = site.udp_bytes()[0]
            row["load_delta"] = os.getloadavg()[0]
            t0 = time.time()
            site.sync()
            t = time.time() - t0
            ideal = n * 4096 / rate_Bps
            row.update(delta_secs=t, delta_bytes=n * 4096, delta_ideal=ideal,
                       delta_target=2 * ideal + 2 * rtt / 1000, delta_udp=site.udp_bytes()[0] - u0)
            say(f"{name}: load {row['load_delta']:.1f}, delta of {n} blocks {t:.2f} s (target {row['delta_target']:.2f} s)")
        if "rpo" in SECTIONS:
            churn = int(rate_Bps * CHURN_FRAC)
            say(f"{name}: RPO under {churn / 1e6:.1f} MB/s of 4 KiB random writes for {RPO_SECS} s")
            fio = subprocess.Popen(
                ["fio", "--name=churn", f"--filename={site.vm / 'disk.img'}", "--rw=randwrite", "--bs=4k",
                 "--direct=1", "--ioengine=libaio", "--iodepth=4", f"--rate={churn}", "--time_based=1",
                 f"--runtime={RPO_SECS}", "--randrepeat=0", "--refill_buffers=1",
                 "--output-format=json", f"--output={work / 'fio-rpo.json'}"],
                stdout=subprocess.DEVNULL, stderr=open(work / "fio-rpo.err", "w"))
            lags, states, reasons = [], {}, set()
            nxt = time.time()
            while fio.poll() is None:
                s = status(site.vm)
                if s.get("lag_secs") is not None:
                    lags.append(float(s["lag_secs"]))
                states[s.get("state")] = states.get(s.get("state"), 0) + 1
                if s.get("last_error"):
                    reasons.add(str(s.get("last_error"))[:120])
                nxt += 0.5
                time.sleep(max(0.0, nxt - time.time()))
            t0 = time.time()
            site.sync()
            drain = time.time() - t0
            try:
                fio_bw = json.loads((work / "fio-rpo.json").read_text())["jobs"][0]["write"]["bw_bytes"]
            except Exception:
                fio_bw = 0
            row.update(rpo_p50=pctl(lags, 50), rpo_p99=pctl(lags, 99), rpo_max=max(lags) if lags else None,
                       rpo_samples=len(lags), rpo_states=states, rpo_reasons=sorted(reasons),
                       rpo_churn=fio_bw, rpo_drain=drain)
            say(f"{name}: RPO p50 {row['rpo_p50']} p99 {row['rpo_p99']} max {row['rpo_max']} "
                f"states {states} churn {fio_bw / 1e6:.1f} MB/s, drain {drain:.1f} s")
    except Exception as e:  # keep the other links' figures; report this one as failed
        row["error"] = str(e)[:300]
        say(f"{name}: FAILED: {e}")
    finally:
        site.close()
        if os.environ.get("KEEP", "0") != "1":
            (site.vm / "disk.img").unlink(missing_ok=True)
            shutil.rmtree(work / "store", ignore_errors=True)
    results.append(row)


def verdict(ok):
    return "—" if ok is None else ("PASS" if ok else "MISS")


def median_row(rows):
    """One row from the runs of a link: the median of every figure, the
    runs' figures kept under "runs"."""
    ok = [r for r in rows if "initial_secs" in r]
    if not ok:
        return rows[0]
    out = dict(ok[0])
    for k, v in ok[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
            out[k] = statistics.median(vals)
    out["runs"] = len(ok)
    out["initial_secs_runs"] = [round(r["initial_secs"], 2) for r in ok]
    out["delta_secs_runs"] = [round(r["delta_secs"], 3) for r in ok if "delta_secs" in r]
    return out


def table(results):
    out = ["| link | cc | runs | load | initial (MiB) | time / ideal | link util | target | UDP / payload | 1 % delta: time / target | verdict | RPO p50 / p99 / max | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r and "initial_secs" not in r:
            out.append(f"| {r['link']} | {r['cc']} | FAILED: {r['error']} |")
            continue
        util_target = 0.8 if r["rate_mbit"] >= 1000 else 0.9
        util_ok = r["initial_util"] >= util_target
        d_ok = r["delta_secs"] <= r["delta_target"] if "delta_secs" in r else None
        rpo_ok = (r["rpo_p99"] is not None and r["rpo_p99"] <= 2.0) if "rpo_p99" in r else None
        branch = r["rate_mbit"] <= 10
        f = lambda x: "—" if x is None else f"{x:.1f}"
        f2 = lambda x: "—" if x is None else f"{x:.2f}"
        payload = r.get("initial_payload") or 0
        out.append(
            f"| {r['link']} | {r['cc']} | {r.get('runs', 1)} | {f(r.get('load_initial'))} | {r['size_mib']} | {r['initial_secs']:.1f} s / {r['initial_ideal']:.1f} s "
            f"| {r['initial_util'] * 100:.0f} % | ≥ {util_target * 100:.0f} % {verdict(util_ok)} "
            f"| {r['initial_udp'] / 2**20:.1f} / {payload / 2**20:.1f} MiB "
            f"| {f2(r.get('delta_secs'))} s / {f2(r.get('delta_target'))} s | {verdict(d_ok)} "
            f"| {f(r.get('rpo_p50'))} / {f(r.get('rpo_p99'))} / {f(r.get('rpo_max'))} s "
            f"| {'see note' if branch else verdict(rpo_ok)} |")
    return "\n".join(out)


def main():
    results = []
    for spec in LINKS:
        rate, rtt, loss = (float(x) for x in spec.split(":"))
        for cc in CCS:
            # Runs interleave the variants, so each sees the same host load.
            rows = {v: [] for v in VARIANTS}
            for i in range(RUNS):
                for v in VARIANTS:
                    bench_link((rate, rtt, loss), cc, rows[v], i, v)
            for v in VARIANTS:
                results.append(median_row(rows[v]))
                results[-1]["all_runs"] = rows[v]
    t = table(results)
    print(t)
    outdir = REPO / "bench-results"
    outdir.mkdir(exist_ok=True)
    (outdir / f"wan-{STAMP}.md").write_text(t + "\n")
    (outdir / f"wan-{STAMP}.json").write_text(json.dumps(results, indent=1, default=str))
    say(f"results in bench-results/wan-{STAMP}.md and .json")


if __name__ == "__main__":
    main()
