"""Delivery benchmark: one satellite delivering N personalized, DKIM-signed messages to local sinks.

Ten test domains, each with its MX on its own loopback address (127.0.0.2 ... 127.0.0.11), are
served by a DNS server on loopback; each MX is a Postfix ``smtp-sink`` on the same port. In the
same run, on the same sinks, Postfix's ``smtp-source`` sends the same number of messages of the
same size with the same concurrency (``-d``: several messages per connection): the reference.

Then a real ``cm-master`` (its own database) and one real ``cm-satellite`` deliver a mailing of
N recipients (every message personalized and RSA-2048 DKIM-signed, or Ed25519 with --ed25519).
Printed:

* the end-to-end rate: ``start_mailing`` until ``list_mailings`` says FINISHED (every
  recipient's outcome reported and written by the master);
* the satellite pipeline rate: messages accepted by the sinks per second, from the first to the
  last message the sinks counted (the sending itself, whatever the master's writes cost);
* each with its ratio to smtp-source, and the peak memory (VmHWM) of the master and satellite
  (and FerretDB), with the CPU seconds each used during the mailing (where the time goes);
* their resident memory every 10 s while delivering, and its first and last values: memory
  must stay flat as the mailing goes on (run it with 20,000 and 200,000 messages to compare);
* the work limit: 2 cores / (CPU per message to compose and sign, with the satellite's own code,
  + CPU per message of its SMTP client, from bench/smtp_client.py), each measured before and
  after the mailing, the faster of the two used (this machine's speed drifts from minute to minute,
  and a slow moment must not lower the limit);
  composing is measured with the other core idle, and also in two processes at once: both cores
  busy, each does less (the limit with that cost is printed too);
* the CPU per message of every process (the satellite's own, its workers, the sinks, this
  benchmark), and how long the mailing takes to start and to be seen FINISHED.

    .venv/bin/python bench/delivery.py [--messages N] [--size BYTES] [--ed25519] [--compose-workers N]
                                       [--max-composed-bytes N] [--profile DIR]

Big messages, bounded memory: the satellite composes only ``max_composed_bytes`` ahead of
sending, so its peak memory does not grow with lease size × message size. Compare, e.g.,
``--messages 100 --size 1500000 --lease-size 100`` with ``--max-composed-bytes 4194304`` and
``--max-composed-bytes 1000000000`` (everything leased composed at once, as before the bound).

Needs ``smtp-sink`` and ``smtp-source`` (Debian: ``apt-get install postfix``). Uses
CM_MONGODB_URL when set, else starts the embedded database (bin/embedded-db: FerretDB on a private
PostgreSQL cluster) in a temporary directory. With FerretDB the end-to-end rate is bound by the
database: 20,000 messages take about a minute and 200,000 about 25 minutes on 2 cores.

A master that stops answering is detected (API calls time out after --api-timeout) and reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloudmailing.satellite.composer import compose, prepare  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402
from tests.embedded_db import EmbeddedDatabase  # noqa: E402
from tests.satellite.dns_server import DnsTestServer  # noqa: E402

DOMAINS = [(f"d{i}.bench.test", f"127.0.0.{2 + i}") for i in range(10)]
MAIL_FROM = "news@sender.bench.test"
SERIAL = "bench-satellite"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_MESG = re.compile(rb"mesg=(\d+)")


# -- the sinks ------------------------------------------------------------------------------


FINAL_STRETCH = 1000  # recipients pending from which the end of a mailing is polled closely
COUNTER_READ_PAUSE = 0.05  # seconds between two reads of a sink's counter


@dataclass
class Sink:
    """One ``smtp-sink`` process and its running message counter, read from its ``-c`` output."""

    address: str
    process: subprocess.Popen[bytes]
    count: int = 0
    changes: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self) -> None:
        """Reader thread: the counter line is rewritten with ``\\r``; keep each new value."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            found = _MESG.findall(chunk)
            if found and int(found[-1]) != self.count:
                with self.lock:
                    self.count = int(found[-1])
                    self.changes.append((time.monotonic(), self.count))
            # The sink writes its counter per message: read it a few times a second, not once per
            # message, so that this benchmark takes little of the CPU it measures.
            time.sleep(COUNTER_READ_PAUSE)

    def window(self, baseline: int) -> tuple[float, float, int] | None:
        """First time the count passed ``baseline``, last change time, messages since baseline."""
        with self.lock:
            after = [(moment, count) for moment, count in self.changes if count > baseline]
        if not after:
            return None
        return after[0][0], after[-1][0], after[-1][1] - baseline


def start_sinks(sink_binary: str, port: int) -> list[Sink]:
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root
    sinks = []
    for _, address in DOMAINS:
        process = subprocess.Popen([sink_binary, "-c", *user, f"{address}:{port}", "1000"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        sink = Sink(address, process)
        threading.Thread(target=sink.follow, daemon=True).start()
        sinks.append(sink)
    for _, address in DOMAINS:
        wait_for_address(address, port)
    return sinks


def sink_rate(sinks: list[Sink], baselines: list[int]) -> tuple[float, int, float, float]:
    """Messages per second seen by all sinks together (first to last message), their count, and
    the monotonic times of the first and the last."""
    windows = [w for w in (s.window(b) for s, b in zip(sinks, baselines, strict=True)) if w]
    if not windows:
        return 0.0, 0, 0.0, 0.0
    first, last = min(w[0] for w in windows), max(w[1] for w in windows)
    total = sum(w[2] for w in windows)
    return total / max(last - first, 1e-6), total, first, last


def wait_for_address(address: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address}:{port}")


def port_free_everywhere() -> int:
    """A port free on every sink address (they all listen on the same port, like port 25)."""
    for _ in range(50):
        port = free_port()
        try:
            for _, address in DOMAINS:
                with socket.socket() as probe:
                    probe.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every 127.0.0.x sink address")


# -- the reference --------------------------------------------------------------------------


def smtp_source_run(source_binary: str, port: int, messages: int, size: int, sessions: int) -> float:
    """Seconds smtp-source needs for ``messages`` split over the ten sinks, ``sessions`` each."""
    shares = [messages // len(DOMAINS) + (i < messages % len(DOMAINS)) for i in range(len(DOMAINS))]
    started = time.monotonic()
    processes = [subprocess.Popen([source_binary, "-d", "-s", str(sessions), "-m", str(share), "-l", str(size),
                                   "-f", MAIL_FROM, "-t", f"user@{domain}", f"{address}:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for (domain, address), share in zip(DOMAINS, shares, strict=True) if share]
    for process in processes:
        _, errors = process.communicate()
        if process.returncode:
            raise RuntimeError(f"smtp-source failed: {errors.decode(errors='replace')}")
    return time.monotonic() - started


# -- the mailing ----------------------------------------------------------------------------


def private_key(use_ed25519: bool) -> str:
    key = ed25519.Ed25519PrivateKey.generate() if use_ed25519 else rsa.generate_private_key(65537, 2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def mailing_content(filler_lines: int) -> tuple[str, str, str]:
    """Subject, HTML and plain templates; every part is personalized."""
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt."
    html = ("<html><body><p>Hello {{ firstname }} {{ lastname }},</p>\n"
            + "".join(f"<p>{line} {{{{ firstname }}}} #{n}</p>\n" for n in range(filler_lines))
            + "<p>Your code: {{ code }}</p></body></html>\n")
    plain = ("Hello {{ firstname }} {{ lastname }},\n"
             + "".join(f"{line} #{n}\n" for n in range(filler_lines // 2)) + "Your code: {{ code }}\n")
    return "News for {{ firstname }} {{ lastname }}", html, plain


def contact(index: int) -> dict[str, str]:
    domain = DOMAINS[index % len(DOMAINS)][0]
    return {"email": f"user{index}@{domain}", "firstname": f"First{index}", "lastname": f"Last{index}",
            "code": f"C{index:08d}"}


def signed_size(filler_lines: int, privkey: str) -> int:
    """Bytes of one built and signed message, with the satellite's own code."""
    subject, html, plain = mailing_content(filler_lines)
    prepared = prepare({"id": 1, "mail_from": MAIL_FROM, "sender_name": "Bench", "subject": subject, "html": html,
                        "plain": plain, "charset": "utf-8", "dkim": {"enabled": True, "selector": "s1",
                                                                     "domain": "sender.bench.test",
                                                                     "privkey": privkey}})
    person = contact(123456)
    return len(compose(prepared, {"id": uuid.uuid4().hex, "email": person["email"], "domain": DOMAINS[0][0],
                                  "contact": person}).data)


def filler_for(size: int, privkey: str) -> int:
    """Number of filler lines giving messages of about ``size`` bytes."""
    base, per_line = signed_size(0, privkey), (signed_size(40, privkey) - signed_size(0, privkey)) / 40
    return max(0, round((size - base) / per_line))


def prepared_mailing(filler_lines: int, privkey: str) -> tuple[Any, list[dict[str, Any]]]:
    """The bench's mailing compiled with the satellite's own code, and a hundred recipients."""
    subject, html, plain = mailing_content(filler_lines)
    prepared = prepare({"id": 1, "mail_from": MAIL_FROM, "sender_name": "Bench", "subject": subject, "html": html,
                        "plain": plain, "charset": "utf-8", "dkim": {"enabled": True, "selector": "s1",
                                                                     "domain": "sender.bench.test",
                                                                     "privkey": privkey}})
    leased = [{"id": f"r{index}", "email": person["email"], "domain": DOMAINS[0][0], "contact": person}
              for index, person in enumerate(contact(index) for index in range(100))]
    return prepared, leased


def compose_cpu_per_message(filler_lines: int, privkey: str, rounds: int = 25) -> float:
    """CPU seconds to personalize and sign one message, with the satellite's own code, the other
    core idle: the median of ``rounds`` rounds of a hundred (this machine's speed moves from
    second to second)."""
    compose_round = warmed_composer(filler_lines, privkey)
    return statistics.median(compose_round() for _ in range(rounds))


def compose_cpu_in_window(filler_lines: int, privkey: str, start: float, end: float) -> float:
    """As :func:`compose_cpu_per_message`, for rounds run between the wall-clock times ``start``
    and ``end`` only: two processes running this at once measure the cost with both cores busy."""
    compose_round = warmed_composer(filler_lines, privkey)
    per_message = []
    while time.time() < end:
        begun = time.time()
        cpu = compose_round()
        if begun >= start and time.time() <= end:
            per_message.append(cpu)
    return statistics.median(per_message)


def warmed_composer(filler_lines: int, privkey: str) -> Callable[[], float]:
    """A round of composing the bench's hundred recipients, returning its CPU seconds per message
    (the first message, which fills caches, already composed)."""
    prepared, leased = prepared_mailing(filler_lines, privkey)
    compose(prepared, leased[0])

    def compose_round() -> float:
        started = time.process_time()
        for recipient in leased:
            compose(prepared, recipient)
        return (time.process_time() - started) / len(leased)

    return compose_round


def compose_cpu_both_cores(filler_lines: int, privkey: str, seconds: float = 3.0) -> float:
    """CPU seconds per message when both cores compose at once, each in its own process: the
    mean of their medians. Two busy cores of this machine each do less than one core alone (they
    share the host's core, caches and memory), which the one-core figure cannot show."""
    context = multiprocessing.get_context("spawn")
    start = time.time() + 3.0  # both processes started, imported and warmed up by then
    with context.Pool(2) as pool:
        medians = pool.starmap(compose_cpu_in_window, [(filler_lines, privkey, start, start + seconds)] * 2)
    return statistics.mean(medians)


@dataclass(frozen=True)
class Work:
    """The work limit's costs, CPU seconds per message: composing and signing (the other core
    idle, and both cores composing at once) and sending."""

    compose: float
    compose_both_cores: float
    send: float

    @staticmethod
    def faster(before: Work, after: Work) -> Work:
        """Each cost at the faster of its two measures: a slow moment of the machine during one of
        them would lower the limit, and so raise the ratio the target is judged on."""
        return Work(*(min(a, b) for a, b in zip(dataclasses.astuple(before), dataclasses.astuple(after),
                                                 strict=True)))


def work_per_message(filler_lines: int, privkey: str, size: int) -> Work:
    """The reference's costs, measured now."""
    return Work(compose_cpu_per_message(filler_lines, privkey), compose_cpu_both_cores(filler_lines, privkey),
                send_cpu_per_message(size))


def send_cpu_per_message(size: int, count: int = 3000) -> float:
    """CPU seconds of the SMTP client (``DeliveryScheduler``) per message, from bench/smtp_client.py."""
    output = subprocess.run([sys.executable, str(ROOT / "bench" / "smtp_client.py"), "--messages", str(count),
                             "--size", str(size), "--rounds", "1"], capture_output=True, text=True, cwd=ROOT,
                            check=True).stdout
    found = re.search(r"DeliveryScheduler .* ([\d.]+) us/msg", output)
    if not found:
        raise RuntimeError(f"bench/smtp_client.py said:\n{output}")
    return float(found.group(1)) / 1e6


# -- processes ------------------------------------------------------------------------------


def start_database(tmp: Path) -> tuple[str, EmbeddedDatabase | None]:
    if os.environ.get("CM_MONGODB_URL"):
        return os.environ["CM_MONGODB_URL"], None
    database = EmbeddedDatabase(tmp / "db", searchable_from=tmp)
    return database.url, database


# The guard matters: compose workers are spawned interpreters that import the main script again.
LAUNCHER = """import sys
sys.path.insert(0, {root!r})
from cloudmailing.cli.{module} import main
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""
# With --profile: CPU time (not wall time, which counts the waits of a busy machine), saved at exit.
PROFILED_LAUNCHER = """import atexit, cProfile, sys, time
sys.path.insert(0, {root!r})
from cloudmailing.cli.{module} import main
if __name__ == "__main__":
    profile = cProfile.Profile(time.process_time)
    atexit.register(lambda: profile.dump_stats({output!r}))
    profile.enable()
    sys.exit(main(sys.argv[1:]))
"""


def cli(module: str, config: Path, args: argparse.Namespace) -> list[str]:
    """The command running ``cloudmailing.cli.<module>``, under cProfile with --profile."""
    launcher = config.with_suffix(".py")
    template = PROFILED_LAUNCHER if args.profile else LAUNCHER
    output = str(args.profile / f"{module}.prof") if args.profile else ""
    launcher.write_text(template.format(root=str(ROOT), module=module, output=output))
    return [sys.executable, str(launcher), "--config", str(config)]


def write_config(path: Path, common: str, log_file: Path) -> Path:
    path.write_text(common + f"[logging]\nlevel = WARNING\nfile = {log_file}\n")
    return path


def peak_memory_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def resident_mb(pid: int) -> float:
    """VmRSS of a process and its live children, in MiB."""
    total = 0.0
    for process in (pid, *children(pid)):
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Live child processes (the satellite's compose workers)."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live children (workers started during the run begin at zero)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def postgres_cpu_seconds(postmaster: int) -> float:
    """CPU used so far by our PostgreSQL server: the postmaster, its live backends, and the
    backends that ended (counted in the postmaster's children time)."""
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return tree_cpu_seconds(postmaster) + reaped


def stop(process: subprocess.Popen[Any] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def print_profile(path: Path, title: str) -> None:
    import pstats

    if not path.exists():
        return
    print(f"\n--- {title}: top functions by own time ({path}) ---")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(12)


# -- the run --------------------------------------------------------------------------------


@dataclass
class MailingResult:
    seconds: float
    mailing: dict[str, Any]
    finished: bool
    memory: dict[str, float]
    cpu: dict[str, float]
    ingest_seconds: float
    resident: list[tuple[int, float, float]]  # every 10 s: messages at the sinks, master MiB, satellite MiB
    idle: dict[str, float]  # CPU seconds per second of each process before the mailing starts
    started: float  # monotonic times of start_mailing and of FINISHED seen
    ended: float
    parts: dict[str, float]  # CPU seconds of the satellite's own process and of the sinks


IDLE_SECONDS = 10.0


def idle_cpu(watched: dict[str, int], postmaster: int | None) -> dict[str, float]:
    """CPU seconds per second of each process, linked and waiting, before the mailing starts: what
    a master, its database and an idle satellite cost with nothing to send."""
    time.sleep(2)  # the satellite's first lease, answered empty
    before = {name: tree_cpu_seconds(pid) for name, pid in watched.items()}
    pg_before = postgres_cpu_seconds(postmaster) if postmaster else 0.0
    time.sleep(IDLE_SECONDS)
    idle = {name: (tree_cpu_seconds(pid) - before[name]) / IDLE_SECONDS for name, pid in watched.items()}
    if postmaster:
        idle["postgresql"] = (postgres_cpu_seconds(postmaster) - pg_before) / IDLE_SECONDS
    return idle


def wait_connected(proxy: Any, satellite: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if satellite.poll() is not None:
            raise RuntimeError(f"the satellite exited:\n{tail(log)}")
        if any(s["serial"] == SERIAL and s.get("connected") for s in proxy.cloud_list_satellites()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the satellite did not connect:\n{tail(log)}")


class _TimedTransport(xmlrpc.client.SafeTransport):
    """HTTPS to the master (its certificate is self-signed), calls timing out after ``timeout``."""

    def __init__(self, timeout: float) -> None:
        super().__init__(context=ssl._create_unverified_context())
        self._timeout = timeout

    def make_connection(self, host: Any) -> Any:
        connection = super().make_connection(host)
        connection.timeout = self._timeout
        return connection


def api_proxy(url: str, timeout: float) -> Any:
    return xmlrpc.client.ServerProxy(url, transport=_TimedTransport(timeout), allow_none=True)


def follow_mailing(url: str, proxy: Any, mailing_id: int, sinks: list[Sink], timeout: float,
                   watched: dict[str, int], postmaster: int | None, resident: list[tuple[int, float, float]],
                   ) -> tuple[float, float, dict[str, Any], bool, dict[str, float], dict[str, float]]:
    """Poll until FINISHED (or timeout); returns the start and end times, the mailing, finished?,
    CPU seconds used by each watched process tree, and by the satellite's own process and the sinks.
    Appends the master's and satellite's resident memory to ``resident`` every 10 s."""
    cpu_before = {name: tree_cpu_seconds(pid) for name, pid in watched.items()}
    parts_before = _parts_cpu(watched["satellite"], sinks)
    pg_before = postgres_cpu_seconds(postmaster) if postmaster else 0.0
    baseline = sum(s.count for s in sinks)
    started = time.monotonic()
    proxy.start_mailing(mailing_id)
    proxy.mailing_manager_force_check()  # RUNNING now, not at the master's next check
    next_progress = started + 10
    mailing: dict[str, Any] = {"status": "STALLED", "total_sent": 0, "total_error": 0, "total_softbounce": 0,
                               "total_pending": -1}
    while True:
        try:
            if mailing["total_pending"] == 0:  # finish now, not at the master's next 5 s check
                # Its own connection and time: it counts the recipients (on FerretDB, a minute at 200,000).
                api_proxy(url, max(timeout - (time.monotonic() - started), 1)).mailing_manager_force_check()
            mailing = proxy.list_mailings({"id": [mailing_id]})[0]
        except OSError as error:  # the API timed out: the master waits on its database
            print(f"  the master stopped answering ({error!r}): its database is stuck", flush=True)
            mailing = dict(mailing, status="STALLED")
            now = time.monotonic()
            break
        now = time.monotonic()
        if mailing["status"] == "FINISHED" or now - started > timeout:
            break
        if now >= next_progress:
            at_sinks = sum(s.count for s in sinks) - baseline
            resident.append((at_sinks, resident_mb(watched["master"]), resident_mb(watched["satellite"])))
            print(f"  {now - started:6.0f} s: status {mailing['status']}, sent {mailing['total_sent']}, "
                  f"pending {mailing['total_pending']}, at the sinks {at_sinks}, resident memory: "
                  f"master {resident[-1][1]:.0f} MiB, satellite {resident[-1][2]:.0f} MiB", flush=True)
            next_progress = now + 10
        # A poll costs the master little; near the end, poll often: the run's end is seen within
        # 20 ms of the master's FINISHED, not up to 250 ms later (2% of a 20,000-message run).
        time.sleep(0.02 if 0 <= mailing["total_pending"] <= FINAL_STRETCH else 0.25)
    cpu = {name: tree_cpu_seconds(pid) - cpu_before[name] for name, pid in watched.items()}
    if postmaster:
        cpu["postgresql"] = postgres_cpu_seconds(postmaster) - pg_before
    parts = {name: seconds - parts_before[name] for name, seconds in _parts_cpu(watched["satellite"], sinks).items()}
    return started, now, mailing, mailing["status"] == "FINISHED", cpu, parts


def _parts_cpu(satellite: int, sinks: list[Sink]) -> dict[str, float]:
    return {"the satellite's own process": cpu_seconds(satellite),
            "the 10 smtp-sinks": sum(cpu_seconds(sink.process.pid) for sink in sinks),
            "this benchmark (DNS server, sink counters)": cpu_seconds(os.getpid()),
            **machine_cpu_seconds()}


def machine_cpu_seconds() -> dict[str, float]:
    """All cores' time so far, from /proc/stat: busy, idle, and stolen by the hypervisor (time
    this virtual machine wanted a core and its host gave it to someone else)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return {"machine busy": (user + nice + system + irq + softirq) / CLOCK_TICKS,
            "machine idle": (idle + iowait) / CLOCK_TICKS, "machine stolen": steal / CLOCK_TICKS}


def run_mailing(args: argparse.Namespace, tmp: Path, sink_port: int, dns: DnsTestServer, sinks: list[Sink],
                database: EmbeddedDatabase | None) -> MailingResult:
    mongo_url = args.mongo_url
    api_port, link_port = free_port(), free_port()
    common = (f"[database]\nurl = {mongo_url}\nname = {args.db_name}\n"
              f"[api]\nhost = 127.0.0.1\nport = {api_port}\n"
              f"[satellite_link]\nhost = 127.0.0.1\nport = {link_port}\n"
              f"[dispatch]\nlease_seconds = 3600\n"
              f"[satellite]\nmaster_host = 127.0.0.1\nmaster_port = {link_port}\nserial = {SERIAL}\n"
              f"secret = bench-secret\nhelo_hostname = sat.bench.test\ndns_servers = {dns.nameserver}\n"
              f"smtp_port = {sink_port}\nlease_size = {args.lease_size}\ncompose_workers = {args.compose_workers}\n"
              f"max_connections = {10 * args.sessions}\nmax_connections_per_host = {args.sessions}\n"
              f"connect_timeout = 10\nreply_timeout = 30\nmax_composed_bytes = {args.max_composed_bytes}\n"
              f"[paths]\ndata_dir = {tmp / 'data'}\n")
    master_config = write_config(tmp / "master.ini", common, tmp / "master.log")
    satellite_config = write_config(tmp / "satellite.ini", common, tmp / "satellite.log")
    key = subprocess.run([sys.executable, "-m", "cloudmailing.cli.admin", "--config", str(master_config),
                          "api-key", "create", "--name", "bench"], capture_output=True, text=True,
                         check=True).stdout.strip()
    master = subprocess.Popen(cli("master", master_config, args), stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "master.err", "wb"), cwd=ROOT)
    satellite = None
    try:
        wait_for_port(api_port, timeout=60)
        url = f"https://admin:{key}@127.0.0.1:{api_port}/CloudMailing"
        proxy = api_proxy(url, args.api_timeout)
        privkey = private_key(args.ed25519)
        subject, html, plain = mailing_content(filler_for(args.size, privkey))
        mailing_id = proxy.create_mailing(MAIL_FROM, "Bench", subject, html, plain, "utf-8")
        proxy.set_mailing_properties(mailing_id, {"dkim": {"enabled": True, "selector": "s1",
                                                           "domain": "sender.bench.test", "privkey": privkey}})
        started = time.monotonic()
        for first in range(0, args.messages, 1000):
            proxy.add_recipients(mailing_id, [contact(i) for i in range(first, min(first + 1000, args.messages))])
            if (first + 1000) % 100_000 == 0:
                print(f"  ingest: {first + 1000:,} recipients in {time.monotonic() - started:.0f} s, resident memory: "
                      f"master {resident_mb(master.pid):.0f} MiB", flush=True)
        ingest_seconds = time.monotonic() - started
        proxy.cloud_add_satellite(SERIAL, {})
        satellite = subprocess.Popen(cli("satellite", satellite_config, args), stdout=subprocess.DEVNULL,
                                     stderr=open(tmp / "satellite.err", "wb"), cwd=ROOT)
        wait_connected(proxy, satellite, tmp / "satellite.log")
        watched = {"master": master.pid, "satellite": satellite.pid}
        if database is not None:
            watched["ferretdb"] = database.ferretdb_pid
        resident: list[tuple[int, float, float]] = []
        idle = idle_cpu(watched, database.postgres_pid if database else None)
        started, ended, mailing, finished, cpu, parts = follow_mailing(
            url, proxy, mailing_id, sinks, args.timeout, watched, database.postgres_pid if database else None,
            resident)
        memory = {name: peak_memory_mb(pid) for name, pid in watched.items()}
        workers = children(satellite.pid)
        if workers:
            memory[f"its {len(workers)} child processes"] = sum(peak_memory_mb(pid) for pid in workers)
        return MailingResult(ended - started, mailing, finished, memory, cpu, ingest_seconds, resident, idle,
                             started, ended, parts)
    finally:
        stop(satellite)
        stop(master)
        for name in ("master", "satellite"):
            errors = tail(tmp / f"{name}.log", 5)
            if errors:
                print(f"  last lines of the {name} log:\n{errors}")


def find_postfix_tools() -> tuple[str, str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"
    sink, source = shutil.which("smtp-sink", path=path), shutil.which("smtp-source", path=path)
    if not (sink and source):
        sys.exit("smtp-sink and smtp-source (Postfix) are needed: install them, e.g. on Debian/Ubuntu\n"
                 "    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix\n"
                 "(the Postfix daemon itself need not run).")
    return sink, source


def report(args: argparse.Namespace, backend: str, source_rate: float, result: MailingResult,
           pipeline_rate: float, at_sinks: int, work_before: Work, work_after: Work) -> None:
    key = "Ed25519" if args.ed25519 else "RSA-2048"
    mailing = result.mailing
    print(f"\ndatabase: {backend}; {args.messages} messages of ~{args.size} bytes, personalized, {key} DKIM; "
          f"10 domains, {args.sessions} connections per MX ({10 * args.sessions} in all), "
          f"{args.compose_workers} compose workers, at most {args.max_composed_bytes:,} bytes composed ahead")
    print(f"add_recipients: {args.messages / result.ingest_seconds:,.0f} recipients/s (not part of the rates)")
    print(f"mailing: {mailing['status']}, sent {mailing['total_sent']}, errors {mailing['total_error']}, "
          f"soft bounces {mailing['total_softbounce']}, pending {mailing['total_pending']}; "
          f"messages at the sinks {at_sinks}")
    if not result.finished:
        print(f"NOT FINISHED within --timeout {args.timeout:.0f} s: the end-to-end rate below counts the "
              f"recipients reported so far. Use a smaller --messages on this database.")
    if mailing["status"] == "STALLED":
        print("STALLED: the master stopped answering (its database stuck), no end-to-end figure.")
    e2e_rate = mailing["total_sent"] / result.seconds
    print(f"smtp-source (reference):            {source_rate:10,.0f} messages/s")
    print(f"end to end (start -> FINISHED):     {e2e_rate:10,.0f} messages/s   ratio {e2e_rate / source_rate:.3f}"
          f"   ({result.seconds:.1f} s)")
    print(f"satellite pipeline (at the sinks):  {pipeline_rate:10,.0f} messages/s   "
          f"ratio {pipeline_rate / source_rate:.3f}")
    work = Work.faster(work_before, work_after)
    work_limit = 2 / (work.compose + work.send)
    print(f"work limit (2 cores / ({work.compose * 1000:.3f} ms to compose and sign + {work.send * 1000:.3f} ms to "
          f"send, per message, measured in this run)): {work_limit:,.0f} messages/s")
    print(f"  measured before the mailing: {work_before.compose * 1000:.3f} + {work_before.send * 1000:.3f} ms; "
          f"after it: {work_after.compose * 1000:.3f} + {work_after.send * 1000:.3f} ms (the faster is used)")
    ratio = e2e_rate / work_limit
    failed = mailing["total_error"] + mailing["total_softbounce"]
    verdict = "met" if ratio >= 0.5 and not failed else "MISSED"
    print(f"end to end / work limit: {ratio:.3f}   (target >= 0.5: {verdict})"
          + (f"   {failed:,} recipients not delivered: every one should be" if failed else ""))
    both_limit = 2 / (work.compose_both_cores + work.send)
    print(f"  composing on both cores at once costs {work.compose_both_cores * 1000:.3f} ms a message "
          f"({work.compose_both_cores / work.compose - 1:+.0%}; before {work_before.compose_both_cores * 1000:.3f}, "
          f"after {work_after.compose_both_cores * 1000:.3f}): with that cost the work limit is {both_limit:,.0f} "
          f"messages/s, end to end / that limit {e2e_rate / both_limit:.3f}")
    print("peak memory (VmHWM): " + ", ".join(f"{name} {mb:,.0f} MiB" for name, mb in result.memory.items()))
    if len(result.resident) >= 2:  # flat memory: the last sample close to the first
        (first_sent, master_first, satellite_first), (last_sent, master_last, satellite_last) = (
            result.resident[0], result.resident[-1])
        print(f"resident memory from {first_sent:,} to {last_sent:,} messages sent: master {master_first:.0f} -> "
              f"{master_last:.0f} MiB, satellite (with workers) {satellite_first:.0f} -> {satellite_last:.0f} MiB")
    print("idle, linked, before the mailing (CPU ms per second): "
          + ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in result.idle.items()))
    print(f"CPU seconds during the {result.seconds:.1f} s mailing: "
          + ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.cpu.items()))
    delivered = max(mailing["total_sent"] + mailing["total_error"], 1)
    server = {name: seconds for name, seconds in result.cpu.items() if name != "satellite"}
    print("database + master CPU per delivered recipient: "
          + ", ".join(f"{name} {seconds / delivered * 1000:.3f} ms" for name, seconds in server.items())
          + f"; total {sum(server.values()) / delivered * 1000:.3f} ms   (target <= 0.15)")
    per_message = result.cpu["satellite"] / max(at_sinks, 1)
    print(f"satellite CPU per message: {per_message * 1000:.2f} ms (one core would sustain "
          f"~{1 / max(per_message, 1e-9):,.0f} messages/s if the master kept it fed)")
    own = result.parts["the satellite's own process"]
    print(f"  of which its own process {own / max(at_sinks, 1) * 1000:.3f} ms, its compose workers "
          f"{(result.cpu['satellite'] - own) / max(at_sinks, 1) * 1000:.3f} ms; the 10 smtp-sinks "
          f"{result.parts['the 10 smtp-sinks'] / max(at_sinks, 1) * 1000:.3f} ms per message")
    print(f"this benchmark's own process (DNS server, sink counters): "
          f"{result.parts['this benchmark (DNS server, sink counters)'] / max(at_sinks, 1) * 1000:.3f} ms per message")
    machine = {name: result.parts[f"machine {name}"] for name in ("busy", "idle", "stolen")}
    total = max(sum(machine.values()), 1e-9)
    print(f"the machine's cores during the mailing: busy {machine['busy'] / total:.0%}, idle "
          f"{machine['idle'] / total:.0%}, stolen by the hypervisor {machine['stolen'] / total:.1%}; busy "
          f"{machine['busy'] / max(at_sinks, 1) * 1000:.3f} ms per message")


def print_machine_speed(sinks_in_mailing: float, sinks_under_source: float) -> None:
    """The sinks as a gauge of the machine's speed: the same C program doing the same work a
    message under smtp-source and during the mailing. In this machine's fast minutes they cost
    1.0-1.15 times as much during the mailing; in its slow minutes every process, the sinks
    included, costs ~1.4 times as much, and the compose reference measured before the mailing
    does not see it."""
    factor = sinks_in_mailing / sinks_under_source
    print(f"the machine's speed: the sinks cost {factor:.2f} times as much a message during the mailing as under "
          f"smtp-source" + ("" if factor <= 1.2 else " (above 1.2: the machine ran slower during the mailing "
                                                     "than when the references were measured)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=20_000, help="bytes per message (default 20000)")
    parser.add_argument("--ed25519", action="store_true", help="sign with Ed25519 instead of RSA-2048")
    parser.add_argument("--sessions", type=int, default=4,
                        help="connections per MX, for the satellite and for smtp-source (default 4)")
    parser.add_argument("--compose-workers", type=int, default=2,
                        help="the satellite's compose_workers (default 2: both cores sign)")
    parser.add_argument("--lease-size", type=int, default=1000, help="the satellite's lease_size (default 1000)")
    parser.add_argument("--max-composed-bytes", type=int, default=32 * 1024 * 1024,
                        help="the satellite's max_composed_bytes (default 32 MiB)")
    parser.add_argument("--api-timeout", type=float, default=60, help="seconds before an API call counts as stuck")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for FINISHED (default 1800)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run master and satellite under cProfile, keep the profiles in DIR, print the top")
    args = parser.parse_args()
    sink_binary, source_binary = find_postfix_tools()
    socket.setdefaulttimeout(args.api_timeout)  # a stuck master must not hang the benchmark
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up the children when killed
    if args.profile:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    backend = "MongoDB (CM_MONGODB_URL)" if os.environ.get("CM_MONGODB_URL") else "FerretDB/PostgreSQL"
    with tempfile.TemporaryDirectory() as tmp_name, DnsTestServer() as dns:
        tmp = Path(tmp_name)
        for domain, address in DOMAINS:
            dns.add_mail_domain(domain, address)
        sink_port = port_free_everywhere()
        sinks = start_sinks(sink_binary, sink_port)
        database = None
        try:
            print(f"smtp-source: {args.messages} messages of {args.size} bytes to 10 smtp-sinks on port {sink_port}",
                  flush=True)
            sinks_before = sum(cpu_seconds(sink.process.pid) for sink in sinks)
            source_rate = args.messages / smtp_source_run(source_binary, sink_port, args.messages, args.size,
                                                          args.sessions)
            time.sleep(0.2)  # the sinks' last replies
            sinks_for_source = (sum(cpu_seconds(sink.process.pid) for sink in sinks) - sinks_before) / args.messages
            key = private_key(args.ed25519)
            work_before = work_per_message(filler_for(args.size, key), key, args.size)
            time.sleep(0.5)  # let the sinks' last counters arrive
            args.mongo_url, database = start_database(tmp)
            args.db_name = f"bench_delivery_{uuid.uuid4().hex[:8]}"
            print(f"CloudMailing: master + 1 satellite, database {backend} ({args.db_name})", flush=True)
            baselines = [sink.count for sink in sinks]
            result = run_mailing(args, tmp, sink_port, dns, sinks, database)
            time.sleep(0.5)
            pipeline_rate, at_sinks, first_at_sink, last_at_sink = sink_rate(sinks, baselines)
            # Measured again after the mailing: the reference is the faster of the two, which
            # bracket the run (this machine's speed drifts by a third from minute to minute).
            work_after = work_per_message(filler_for(args.size, key), key, args.size)
            try:
                MongoClient(args.mongo_url, socketTimeoutMS=30_000,
                            serverSelectionTimeoutMS=10_000).drop_database(args.db_name)
            except Exception as error:  # a stuck database: its process is stopped below anyway
                print(f"  could not drop {args.db_name}: {error!r}")
        finally:
            if database is not None:
                database.stop()
            for sink in sinks:
                stop(sink.process)
    report(args, backend, source_rate, result, pipeline_rate, at_sinks, work_before, work_after)
    print(f"the 10 smtp-sinks per message under smtp-source (before the mailing): {sinks_for_source * 1000:.3f} ms")
    if at_sinks and sinks_for_source:
        print_machine_speed(result.parts["the 10 smtp-sinks"] / at_sinks, sinks_for_source)
    if at_sinks:
        print(f"edges: start -> first message at a sink {first_at_sink - result.started:.2f} s, last message at a "
              f"sink -> FINISHED seen {result.ended - last_at_sink:.2f} s")
    if args.profile:
        print_profile(args.profile / "master.prof", "master")
        print_profile(args.profile / "satellite.prof", "satellite")


if __name__ == "__main__":
    main()
