"""pgbench through millpond proxy and PgBouncer, side by side, against one PostgreSQL.

Run:  python bench/proxy_bench.py [--quick] [--duration S] [--repeats N]
                                  [--only TARGET[,TARGET]] [--cases NAME[,NAME]] [--json PATH]

One run starts a throwaway PostgreSQL (:class:`millpond.embedded.PostgresCluster`),
fills it once with ``pgbench -i -s 10``, writes ONE PgBouncer configuration file and
starts both poolers from it (each on its own ``listen_port``; everything else is the
same file): PgBouncer (Debian's ``pgbouncer``, installed by this script when it is
missing and we are root) and ``millpond proxy``. Both run ``pool_mode = transaction``
with the same ``default_pool_size``. Every case runs pgbench against the server
directly, through PgBouncer and through millpond, interleaved (direct, pgbouncer,
millpond, direct, ...), and each target reports the median of its repeats: TPS,
average latency, and p99 latency computed from pgbench's per-transaction log (``-l``,
written to a temporary directory and deleted). See docs/proxy-benchmarks.md.

If ``millpond proxy`` cannot start (e.g. it is not written yet), its rows say
"not available" and the rest still runs. ``--only ...,floor`` adds a reference target:
bench/floor_pooler.py, the least a transaction pooler in Python on uvloop can do (no
checks, no parsing, same pool size), i.e. the floor under any Python proxy's numbers;
``cfloor`` the same pooler with its data path compiled (``floor_pooler.py --compiled``,
needs Cython), what a compiled data path inside a Python process can reach; ``lane``
the same logins on millpond's compiled lane (``floor_pooler.py --lane``).
``--baseline DIR`` adds another: millpond run from another checkout's ``DIR/src`` (e.g.
``git worktree add /tmp/base HEAD~3``), in the same interleaved rounds, to measure a
change against the code before it; a second ratio table then gives millpond/baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from _common import machine, median, median_interval, spread, table, verdict
from millpond.embedded import PostgresCluster

PACKAGES = ("millpond", "uvloop")
DBNAME = "bench"
USER = "postgres"
TARGETS = ("direct", "pgbouncer", "millpond")
#: ``floor`` (only with --only): bench/floor_pooler.py, a transaction pooler in Python that
#: does nothing it can skip: the floor of what a Python pooler costs, for comparison
#: ``baseline`` (only with --baseline DIR): millpond from another checkout, for A/B runs
#: ``cfloor`` (only with --only): the same with its data path in C (floor_pooler.py
#: --compiled, bench/floor_relay.pyx; needs Cython): what a compiled data path could reach
#: ``lane`` (only with --only): the floor's logins on millpond's compiled lane (floor_pooler.py
#: --lane): what the lane costs before it is wired into the proxy
ALL_TARGETS = (*TARGETS, "floor", "cfloor", "lane", "baseline")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Case:
    name: str
    clients: int
    args: tuple[str, ...]
    script: str | None = None  # a custom script's text (pgbench -f)
    targets: tuple[str, ...] = ALL_TARGETS
    note: str = ""


#: the cases, in the order they run within a round
CASES = (
    Case("S c=20", 20, ("-S",)),
    Case("S c=100", 100, ("-S",)),
    Case(
        "S c=1000",
        1000,
        ("-S",),
        targets=("pgbouncer", "millpond", "floor", "cfloor", "lane", "baseline"),
        note="1000 server processes are what a pooler avoids",
    ),
    Case("S -C c=20", 20, ("-S", "-C"), targets=ALL_TARGETS),
    Case("select 1 c=100", 100, (), script="SELECT 1;\n"),
    Case("S -M prepared c=100", 100, ("-S", "-M", "prepared"), targets=(*TARGETS, "baseline")),
)

#: (case, minimum millpond/PgBouncer TPS ratio): the targets of issue 3
TPS_TARGETS = {"S c=20": 0.9, "S c=100": 1.0, "S c=1000": 1.0, "S -C c=20": 1.0}


# -- processes and files --------------------------------------------------------------


def raise_nofile_limit() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def handle_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` cleans up."""
    signal.signal(signal.SIGTERM, _interrupt)


def service_account() -> pwd.struct_passwd | None:
    """Who runs PgBouncer: it refuses root, so the cluster's unprivileged account."""
    if os.geteuid() != 0:
        return None
    for name in ("millpond", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and found no unprivileged user to run PgBouncer")


def find_pgbouncer(install: bool = True) -> tuple[str | None, str]:
    """PgBouncer's binary and version, installing Debian's package when root; or why not."""
    binary = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if binary is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("pgbouncer not found: apt-get install -y pgbouncer ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "pgbouncer"],
        ):
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=False)
        binary = shutil.which("pgbouncer")
    if binary is None:
        return None, "not installed: run `sudo apt-get install -y pgbouncer` (Debian/Ubuntu)"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return binary, (out.stdout or out.stderr).splitlines()[0].strip()


def pgbouncer_version_tuple(version: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(g or 0) for g in match.groups()) if match else (0,)


def millpond_command() -> list[str]:
    """How to run the ``millpond`` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "millpond"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "millpond.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory the unprivileged account can read; deleted afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_ini(
    directory: Path,
    name: str,
    *,
    listen_port: int,
    pg_port: int,
    pool_size: int,
    max_client_conn: int,
    extra: dict[str, str] | None = None,
) -> Path:
    """The one PgBouncer configuration both poolers run (only ``listen_port`` differs)."""
    userlist = directory / "userlist.txt"
    if not userlist.exists():
        userlist.write_text(f'"{USER}" ""\n')
        userlist.chmod(0o644)
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(listen_port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": str(userlist),
        "pool_mode": "transaction",
        "default_pool_size": str(pool_size),
        "max_client_conn": str(max_client_conn),
        "log_connections": "0",
        "log_disconnections": "0",
        **(extra or {}),
    }
    text = "[databases]\n"
    text += f"{DBNAME} = host=127.0.0.1 port={pg_port} dbname={DBNAME} user={USER}\n\n"
    text += "[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


class Proxy:
    """A pooler process: started, waited for until it listens, stopped on exit.

    ``commands`` are tried in order until one listens; that one is used for restarts.
    """

    def __init__(
        self,
        name: str,
        port: int,
        log: Path,
        commands: Sequence[Sequence[str]],
        account: pwd.struct_passwd | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.log = log
        self.commands = [list(c) for c in commands]
        self.account = account
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.error = ""
        self.restarts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> bool:
        """Start the first command that listens; False (and ``error`` set) if none does."""
        errors = []
        for argv in self.commands:
            if self._start(argv):
                self.commands = [argv]
                return True
            errors.append(f"`{' '.join(argv[-2:])}`: {self.error}")
        self.error = "; ".join(errors)
        return False

    def _start(self, argv: list[str]) -> bool:
        self.stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(self.extra_env)
        offset = self.log.stat().st_size if self.log.exists() else 0
        account = self.account
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=self.log.parent,
                start_new_session=True,  # Ctrl-C reaches us only; we stop it ourselves
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.error = f"exited with {self.proc.returncode}: {self.log_tail(offset)}"
                self.proc = None
                return False
            if "listening" in self.log_text(offset).lower() and self._accepts():
                self.error = ""
                return True
            time.sleep(0.05)
        self.error = f"not listening after {READY_TIMEOUT:g}s: {self.log_tail(offset)}"
        self.stop()
        return False

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def log_text(self, offset: int = 0) -> str:
        try:
            with self.log.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, offset: int = 0, lines: int = 3) -> str:
        text = self.log_text(offset).strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pgbouncer_proxy(binary: str, ini: Path, port: int, account: pwd.struct_passwd | None) -> Proxy:
    """PgBouncer on ``ini``, run as ``account`` (it refuses to run as root)."""
    return Proxy("pgbouncer", port, ini.parent / "pgbouncer.log", [[binary, str(ini)]], account)


def millpond_proxy(
    ini: Path, port: int, pg_port: int, pool_size: int, max_client_conn: int
) -> Proxy:
    """``millpond proxy INI``; if that does not start, the same settings as flags."""
    command = [*millpond_command(), "proxy"]
    flags = [*command, "--listen", f"127.0.0.1:{port}"]
    flags += ["--backend", f"postgresql://{USER}@127.0.0.1:{pg_port}/{DBNAME}"]
    flags += ["--pool-mode", "transaction", "--pool-size", str(pool_size)]
    flags += ["--max-client-conn", str(max_client_conn), "--auth-type", "trust"]
    return Proxy("millpond", port, ini.parent / "millpond.log", [[*command, str(ini)], flags])


# -- pgbench -------------------------------------------------------------------------


@dataclass
class Result:
    tps: float = float("nan")
    latency_ms: float = float("nan")
    p99_ms: float = float("nan")
    transactions: int = 0
    error: str = ""
    round: int = 0
    proxy_cpu_pct: float = float("nan")  # the pooler's CPU time / the run's wall time
    proxy_us_per_txn: float = float("nan")  # the pooler's CPU time per transaction
    pgbench_us_per_txn: float = float("nan")  # pgbench's CPU time per transaction
    postgres_us_per_txn: float = float("nan")  # PostgreSQL's (every process's) per txn


def _stat_fields(pid: int | str) -> list[str]:
    """``/proc/PID/stat`` after the command name (field 3 on), or [] if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its threads so far."""
    fields = _stat_fields(pid)
    if not fields:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of all its children, live or exited: for PostgreSQL, the
    postmaster and every process it forked (an exited backend's time is in the
    postmaster's cutime/cstime once reaped)."""
    fields = _stat_fields(pid)
    if not fields:
        return float("nan")
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            child = _stat_fields(entry.name)
            if child and child[1] == str(pid):  # ppid
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def pgbench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def p99_from_logs(prefix: Path) -> tuple[float, int]:
    """p99 latency in ms from pgbench's ``-l`` logs (``prefix.*``), and how many lines."""
    latencies: list[int] = []
    for log in prefix.parent.glob(prefix.name + ".*"):
        with log.open("rb") as f:
            for line in f:
                parts = line.split(maxsplit=3)
                if len(parts) > 2 and parts[2].isdigit():
                    latencies.append(int(parts[2]))
        log.unlink()
    if not latencies:
        return float("nan"), 0
    latencies.sort()
    index = min(len(latencies) - 1, max(0, round(0.99 * len(latencies)) - 1))
    return latencies[index] / 1000.0, len(latencies)


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if any(w in line for w in ("error", "ERROR", "aborted", "FATAL", "could not")):
            return line.strip()[:200]
    return text.strip().splitlines()[-1][:200] if text.strip() else "no output"


def run_pgbench(
    bin_dir: Path, port: int, case: Case, duration: float, scratch: Path, threads: int = 2
) -> Result:
    """One pgbench run of ``case`` against ``port``."""
    prefix = scratch / "pgbench_log"
    argv = [str(bin_dir / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-n"]
    argv += ["-T", str(max(1, round(duration))), "-c", str(case.clients)]
    argv += ["-j", str(min(threads, case.clients)), "-l", f"--log-prefix={prefix}"]
    argv += list(case.args)
    if case.script is not None:
        script = scratch / "custom.sql"
        script.write_text(case.script)
        argv += ["-f", str(script)]
    argv.append(DBNAME)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=pgbench_env(),
            timeout=duration + 120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        p99_from_logs(prefix)
        return Result(error="pgbench timed out")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # pgbench is the one child waited
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    p99, count = p99_from_logs(prefix)
    out = done.stdout + done.stderr
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    latency = re.search(r"^latency average = ([\d.]+) ms", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    if done.returncode != 0 or tps is None or (failed and int(failed.group(1))):
        return Result(error=_first_error(done.stderr or done.stdout))
    return Result(
        tps=float(tps.group(1)),
        latency_ms=float(latency.group(1)) if latency else float("nan"),
        p99_ms=p99,
        transactions=count,
        pgbench_us_per_txn=1e6 * used / count if count else float("nan"),
    )


# -- the run -------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    target: str
    runs: list[Result] = field(default_factory=list)
    status: str = ""  # set when the target did not run this case at all

    def ok(self) -> list[Result]:
        return [r for r in self.runs if not r.error]

    def tps(self) -> float:
        return median([r.tps for r in self.ok()])

    def summary(self) -> list[str]:
        """case, target, TPS, avg ms, p99 ms, spread, proxy CPU, all CPU, note."""
        good = self.ok()
        if not good:
            errors = [r.error for r in self.runs if r.error]
            status = self.status or f"FAILED: {errors[0] if errors else '?'}"
            return [self.case, self.target, "-", "-", "-", "-", "-", "-", status]
        errors = [r.error for r in self.runs if r.error]
        note = f"{len(errors)} of {len(self.runs)} runs failed: {errors[0]}" if errors else ""
        return [
            self.case,
            self.target,
            f"{self.tps():,.0f}",
            f"{median([r.latency_ms for r in good]):.3f}",
            f"{median([r.p99_ms for r in good]):.3f}",
            f"{spread([r.tps for r in good]) * 100:.0f}%" if len(good) > 1 else "",
            _cpu_cell(good),
            _all_cpu_cell(good),
            note,
        ]


def _cpu_cell(runs: list[Result]) -> str:
    pct = median([r.proxy_cpu_pct for r in runs])
    if pct != pct:
        return ""
    return f"{pct:.0f}% {median([r.proxy_us_per_txn for r in runs]):.0f}us/txn"


def _all_cpu_cell(runs: list[Result]) -> str:
    """CPU per transaction of everything that works for it: PostgreSQL + pgbench + the
    pooler = the total (the machine's cores are the limit when all are busy)."""
    pg = median([r.postgres_us_per_txn for r in runs])
    bench = median([r.pgbench_us_per_txn for r in runs])
    pooler = median([r.proxy_us_per_txn for r in runs])
    if pg != pg or bench != bench:
        return ""
    total = pg + bench + (pooler if pooler == pooler else 0.0)
    return f"{pg:.0f}+{bench:.0f}{f'+{pooler:.0f}' if pooler == pooler else ''}={total:.0f}us"


@dataclass
class Targets:
    """Where each target listens, and the proxies (or why a target is not available)."""

    bin_dir: Path
    ports: dict[str, int]
    postmaster: int = 0  # PostgreSQL's pid: its CPU time (all processes) per transaction
    proxies: dict[str, Proxy] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def ready(self, target: str) -> str:
        """'' if ``target`` can take a run now (restarting a crashed proxy), else why not."""
        if target in self.unavailable:
            return self.unavailable[target]
        proxy = self.proxies.get(target)
        if proxy is None or proxy.alive():
            return ""
        if proxy.restarts >= 2:
            return f"crashed: {proxy.log_tail()}"
        proxy.restarts += 1
        print(f"  {target} died ({proxy.log_tail()}); restarting it", file=sys.stderr)
        return "" if proxy.start() else f"crashed; restart failed: {proxy.error}"

    def run(self, case: Case, target: str, duration: float, scratch: Path) -> Result:
        """pgbench ``case`` against ``target``, with the pooler's CPU use."""
        proxy = self.proxies.get(target)
        cpu = cpu_seconds(proxy.pid) if proxy else float("nan")
        pg_cpu = tree_cpu_seconds(self.postmaster) if self.postmaster else float("nan")
        started = time.monotonic()
        result = run_pgbench(self.bin_dir, self.ports[target], case, duration, scratch)
        if self.postmaster and result.transactions:
            pg_used = tree_cpu_seconds(self.postmaster) - pg_cpu
            result.postgres_us_per_txn = 1e6 * pg_used / result.transactions
        if proxy is not None and proxy.alive():
            used = cpu_seconds(proxy.pid) - cpu
            result.proxy_cpu_pct = 100 * used / (time.monotonic() - started)
            if result.transactions:
                result.proxy_us_per_txn = 1e6 * used / result.transactions
        return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 repeat (~1.5 min)")
    parser.add_argument("--duration", type=float, help="seconds per pgbench run (default 3)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--only", help="targets, comma-separated: " + ",".join(ALL_TARGETS))
    parser.add_argument("--cases", help="case names (or unique prefixes), comma-separated")
    parser.add_argument("--pool-size", type=int, default=20, help="default_pool_size (20)")
    parser.add_argument("--max-client-conn", type=int, default=2000)
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (10)")
    parser.add_argument("--json", help="also write the results here as JSON")
    parser.add_argument(
        "--baseline", type=Path, help="also run millpond from this checkout (DIR/src), for A/B"
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 3.0)
    args.repeats = args.repeats or (1 if args.quick else 5)
    wanted = args.only.split(",") if args.only else list(TARGETS)
    if args.baseline is not None:
        if not (args.baseline / "src" / "millpond").is_dir():
            parser.error(f"--baseline: no src/millpond under {args.baseline}")
        if not list((args.baseline / "src" / "millpond").glob("**/_scan*.so")):
            print(
                f"warning: {args.baseline} has no compiled helpers: build them there with "
                "`python setup.py build_ext --inplace` or the baseline runs pure Python",
                file=sys.stderr,
            )
        wanted.append("baseline")
    elif "baseline" in wanted:
        parser.error("--only baseline needs --baseline DIR")
    args.targets = tuple(t for t in ALL_TARGETS if t in wanted)
    if not args.targets or set(wanted) - set(ALL_TARGETS):
        parser.error(f"--only takes some of {', '.join(ALL_TARGETS)}")
    args.case_list = _select_cases(parser, args.cases)
    return args


def _select_cases(parser: argparse.ArgumentParser, wanted: str | None) -> list[Case]:
    if not wanted:
        return list(CASES)
    chosen = []
    for name in (w.strip() for w in wanted.split(",")):
        matches = [c for c in CASES if c.name == name] or [
            c for c in CASES if c.name.startswith(name)
        ]
        if len(matches) != 1:
            parser.error(f"--cases: {name!r} matches {len(matches)} of {[c.name for c in CASES]}")
        chosen.append(matches[0])
    return chosen


def prepare_cluster(pg: PostgresCluster, scale: int) -> None:
    pg.create_database(DBNAME)
    argv = [str(pg.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale)]
    argv += ["-h", "127.0.0.1", "-p", str(pg.port), "-U", USER, DBNAME]
    done = subprocess.run(argv, capture_output=True, text=True, env=pgbench_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {done.stderr.strip()}")
    pg.psql("VACUUM ANALYZE", dbname=DBNAME)


def bench(args: argparse.Namespace, targets: Targets, scratch: Path) -> list[Row]:
    rows = {(c.name, t): Row(c.name, t) for c in args.case_list for t in args.targets}
    for (case_name, target), row in rows.items():
        case = next(c for c in args.case_list if c.name == case_name)
        if target not in case.targets:
            row.status = f"skipped: {case.note}" if case.note and target == "direct" else "skipped"
    # warm up every target once (and find out early whether it works at all)
    warm = Case("warm-up", 20, ("-S",))
    for target in args.targets:
        if targets.ready(target):
            continue
        print(f"  warming up {target} ...", file=sys.stderr)
        result = run_pgbench(targets.bin_dir, targets.ports[target], warm, 1, scratch)
        if result.error:
            print(f"  warm-up through {target} failed: {result.error}", file=sys.stderr)
    for round_no in range(1, args.repeats + 1):
        for case in args.case_list:
            for target in args.targets:
                row = rows[case.name, target]
                if row.status.startswith("skipped"):
                    continue
                why_not = targets.ready(target)
                if why_not:
                    row.status = f"not available: {why_not}"
                    continue
                result = targets.run(case, target, args.duration, scratch)
                result.round = round_no
                row.runs.append(result)
                shown = result.error or f"{result.tps:,.0f} tps, p99 {result.p99_ms:.2f} ms"
                print(f"  round {round_no}  {case.name:<20} {target:<10} {shown}", file=sys.stderr)
                time.sleep(0.3 if "-C" not in case.args else 1.0)
    return list(rows.values())


def ratios(
    rows: list[Row], mine_name: str = "millpond", theirs_name: str = "pgbouncer"
) -> list[dict[str, Any]]:
    """millpond/PgBouncer (or another pair's) TPS per case: the median of the per-round
    ratios.

    Each round runs the two back to back, so a round's ratio cancels most of the drift
    in what else the machine is doing; the range shows how much the rounds disagreed.
    """
    by_key = {(r.case, r.target): r for r in rows}
    out = []
    for case in dict.fromkeys(r.case for r in rows):
        mine, theirs = by_key.get((case, mine_name)), by_key.get((case, theirs_name))
        if mine is None or theirs is None:
            continue
        theirs_by_round = {r.round: r.tps for r in theirs.ok()}
        paired = [r.tps / theirs_by_round[r.round] for r in mine.ok() if r.round in theirs_by_round]
        ratio = median(paired)
        ci_low, ci_high, coverage = median_interval(paired)
        target = TPS_TARGETS.get(case) if theirs_name == "pgbouncer" else None
        result = settled(ratio, ci_low, ci_high, target) if target is not None else ""
        if ratio != ratio:
            result = "n/a"
        low, high = (min(paired), max(paired)) if paired else (float("nan"), float("nan"))
        out.append(
            {"case": case, "ratio": ratio, "low": low, "high": high, "rounds": len(paired)}
            | {"ci_low": ci_low, "ci_high": ci_high, "coverage": coverage}
            | {"ahead": sum(1 for r in paired if r > 1), "target": target, "verdict": result}
        )
    return out


def settled(ratio: float, ci_low: float, ci_high: float, target: float) -> str:
    """The verdict on the median ratio, and whether the rounds settle it: when the
    median's confidence interval holds the target, the verdict is noise's to flip."""
    result = verdict(ratio, target)
    if result in ("meets", "MISSES") and ci_low < target <= ci_high:
        result += " (not settled)"
    return result


def report(
    rows: list[Row],
    ratio_rows: list[dict[str, Any]],
    info: dict[str, Any],
    baseline_rows: list[dict[str, Any]] | None = None,
) -> str:
    headers = ["case", "target", "TPS", "avg ms", "p99 ms", "spread", "pooler CPU"]
    headers += ["CPU/txn pg+bench+pooler", "note"]
    body = [row.summary() for row in rows]
    lines = [
        f"date: {info['date']}; {info['cpus']} CPUs; {info['platform']}; Python {info['python']}",
        f"PostgreSQL {info['postgresql']}; {info['pgbench']}; {info['pgbouncer']}; "
        f"millpond {info['packages'].get('millpond')}",
        f"pool_mode=transaction, default_pool_size={info['pool_size']}, "
        f"max_client_conn={info['max_client_conn']}; pgbench -j 2 -T {info['duration']:g}, "
        f"medians of {info['repeats']} interleaved runs; pgbench -i -s {info['scale']}",
        "load average (1 min) before / after: {} / {}".format(*info["load_average_1min"]),
        "",
        table(headers, body),
        "",
        "millpond / PgBouncer TPS: the median of the per-round ratios, a distribution-free",
        "confidence interval for it, the rounds millpond was ahead in, the range over them:",
    ]
    lines.append(ratio_table(ratio_rows))
    if baseline_rows:
        lines += ["", "millpond / baseline TPS (the change against the code before it):"]
        lines.append(ratio_table(baseline_rows))
    return "\n".join(lines)


def ratio_table(ratio_rows: list[dict[str, Any]]) -> str:
    body = []
    for r in ratio_rows:
        ok = r["ratio"] == r["ratio"]
        ratio = f"{r['ratio']:.2f}x" if ok else "n/a"
        span = f"{r['low']:.2f}-{r['high']:.2f}" if ok else ""
        interval = f"{r['ci_low']:.2f}-{r['ci_high']:.2f} ({r['coverage']:.0%})" if ok else ""
        ahead = f"{r['ahead']}/{r['rounds']}" if ok else ""
        target = f">= {r['target']:.1f}x" if r["target"] is not None else "(no target)"
        body.append([r["case"], ratio, interval, ahead, span, target, r["verdict"]])
    headers = ["case", "ratio", "median's CI", "ahead", "range", "target", "verdict"]
    return table(headers, body)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    handle_sigterm()
    nofile = raise_nofile_limit()
    if nofile < args.max_client_conn + 100:
        print(f"warning: RLIMIT_NOFILE is {nofile}; 1000 clients need ~1100", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        try:
            return _run(args, stack)
        except KeyboardInterrupt:
            print("\ninterrupted: cleaning up", file=sys.stderr)
            return 130
    return 0


def _run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    pgbouncer, pgbouncer_version = None, "PgBouncer not run"
    if "pgbouncer" in args.targets:
        pgbouncer, pgbouncer_version = find_pgbouncer()
    print("starting PostgreSQL and filling it (pgbench -i) ...", file=sys.stderr)
    pg = stack.enter_context(
        PostgresCluster(max_connections=300, settings={"shared_buffers": "256MB"})
    )
    prepare_cluster(pg, args.scale)
    scratch = stack.enter_context(work_dir("millpond-proxybench-"))
    targets = Targets(pg.bin_dir, {"direct": pg.port}, postmaster_pid(pg.data_dir))
    extra = {}
    if pgbouncer and pgbouncer_version_tuple(pgbouncer_version) >= (1, 21):
        extra["max_prepared_statements"] = "200"
    ini_args: dict[str, Any] = {"pg_port": pg.port, "pool_size": args.pool_size}
    ini_args.update(max_client_conn=args.max_client_conn, extra=extra)
    for name in ("pgbouncer", "millpond"):
        if name not in args.targets:
            continue
        if name == "pgbouncer" and pgbouncer is None:
            targets.unavailable[name] = pgbouncer_version
            continue
        port = targets.ports[name] = free_port()
        ini = write_ini(scratch, f"{name}.ini", listen_port=port, **ini_args)
        if name == "pgbouncer":
            assert pgbouncer is not None
            proxy = pgbouncer_proxy(pgbouncer, ini, port, service_account())
        else:
            proxy = millpond_proxy(ini, port, pg.port, args.pool_size, args.max_client_conn)
        stack.enter_context(proxy)
        if proxy.start():
            targets.proxies[name] = proxy
        else:
            targets.unavailable[name] = f"not available ({proxy.error})"
            print(f"{name}: {targets.unavailable[name]}", file=sys.stderr)
    for name in ("floor", "cfloor", "lane"):
        if name not in args.targets:
            continue
        port = targets.ports[name] = free_port()
        command = [sys.executable, str(Path(__file__).with_name("floor_pooler.py"))]
        command += [f"{pg.port}:{port}", "--pool-size", str(args.pool_size)]
        command += {"floor": [], "cfloor": ["--compiled"], "lane": ["--lane"]}[name]
        floor = Proxy(name, port, scratch / f"{name}.log", [command])
        stack.enter_context(floor)
        if floor.start():
            targets.proxies[name] = floor
        else:
            targets.unavailable[name] = f"not available ({floor.error})"
    if "baseline" in args.targets:
        port = targets.ports["baseline"] = free_port()
        ini = write_ini(scratch, "baseline.ini", listen_port=port, **ini_args)
        command = [sys.executable, "-m", "millpond.cli", "proxy", str(ini)]
        env = {"PYTHONPATH": str(args.baseline.resolve() / "src")}
        base = Proxy("baseline", port, scratch / "baseline.log", [command], None, env)
        stack.enter_context(base)
        if base.start():
            targets.proxies["baseline"] = base
        else:
            targets.unavailable["baseline"] = f"not available ({base.error})"
    info = machine(PACKAGES)
    info.update(
        postgresql=pg.psql("SHOW server_version").strip(),
        pgbench=_version_line([str(pg.bin_dir / "pgbench"), "--version"]),
        pgbouncer=pgbouncer_version,
        pool_size=args.pool_size,
        max_client_conn=args.max_client_conn,
        duration=args.duration,
        repeats=args.repeats,
        scale=args.scale,
    )
    print(f"running {len(args.case_list)} cases x {args.repeats} rounds ...", file=sys.stderr)
    load_before = os.getloadavg()[0]
    rows = bench(args, targets, scratch)
    info["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if pgbouncer and pgbouncer_version_tuple(pgbouncer_version) < (1, 21):
        for row in rows:
            if row.target == "pgbouncer" and "prepared" in row.case and not row.ok():
                row.status = f"{pgbouncer_version} predates prepared statements in transaction "
                row.status += f"mode (1.21+): {row.runs[0].error if row.runs else ''}"
    ratio_rows = ratios(rows)
    baseline_rows = ratios(rows, "millpond", "baseline") if "baseline" in args.targets else []
    print(report(rows, ratio_rows, info, baseline_rows))
    if args.json:
        payload = {
            "machine": info,
            "rows": [{**asdict(r), "median_tps": r.tps()} for r in rows],
            "ratios": ratio_rows,
            "ratios_to_baseline": baseline_rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


def _version_line(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


if __name__ == "__main__":
    sys.exit(main())
