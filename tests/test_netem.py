"""The emulated slow network (launchers/netem.sh): namespaces, rate limit, launcher, teardown.

Needs root, iproute2 and ethtool (skipped otherwise, with the reason). Every test uses its
own namespace prefix, so it never touches a benchmark's ``distk-*`` namespaces, and a
fixture tears down and checks that nothing is left behind, also when the test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from script_module import load_script

ROOT = Path(__file__).resolve().parent.parent
NETEM = ROOT / "launchers" / "netem.sh"
CHECK = ROOT / "launchers" / "netem_check.py"
BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544


def _check_module():
    return load_script(CHECK, "netem_check")


def _can_build_namespaces() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs '{tool}' (iproute2)"
    if shutil.which("ethtool") is None:
        return "needs 'ethtool' (netem.sh turns segmentation offloads off with it)"
    probe = f"distk-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else "'ip netns add' is not permitted here"


_NETNS_MISSING = _can_build_namespaces()
needs_netns = pytest.mark.skipif(_NETNS_MISSING is not None, reason=str(_NETNS_MISSING))


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(prefix + "-")]


@pytest.fixture
def netem():
    """Run netem.sh under a prefix of this test's own; always tear down and check."""
    prefix = f"distk-test{os.getpid()}"
    env = {**os.environ, "DISTK_NETEM_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}

    def run(*args: str, timeout: float = 25.0) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(["bash", str(NETEM), *args], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the launcher's trap stops the ranks and tears down.
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"netem.sh {' '.join(args)} did not finish in {timeout}s:\n{err}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    run.prefix = prefix
    try:
        yield run
    finally:
        subprocess.run(["bash", str(NETEM), "down"], env=env, capture_output=True, timeout=30)
    assert _namespaces(prefix) == [], "namespaces left behind"


def test_rate_parsing_and_ring_model():
    check = _check_module()
    assert check.rate_bits_per_second("50mbit") == 50e6
    assert check.rate_bits_per_second("1gbit") == 1e9
    assert check.rate_bits_per_second("10mbps") == 80e6  # tc: bps = bytes per second
    assert check.rate_bits_per_second("none") is None
    with pytest.raises(ValueError, match="rate='fast'"):
        check.rate_bits_per_second("fast")
    # 2 ranks: each sends the whole tensor once; 64 MB at 1 Gbit/s = 0.512 s.
    assert check.ring_allreduce_seconds(64_000_000, 2, 1e9) == pytest.approx(0.512)
    assert check.ring_allreduce_seconds(64_000_000, 4, 1e9) == pytest.approx(0.768)


@needs_netns
def test_up_builds_limited_links_in_benchmark_range(netem):
    result = netem("up", "3", "10mbit")
    assert result.returncode == 0, result.stderr
    prefix = netem.prefix
    assert sorted(_namespaces(prefix)) == sorted(
        [f"{prefix}-br", f"{prefix}-h0", f"{prefix}-h1", f"{prefix}-h2"])
    for host in range(3):
        ns = f"{prefix}-h{host}"
        links = json.loads(subprocess.run(["ip", "-n", ns, "-j", "addr"], capture_output=True,
                                          text=True, check=True).stdout)
        by_name = {link["ifname"]: link for link in links}
        assert "UP" in by_name["lo"]["flags"]
        inet = [a["local"] for a in by_name["veth0"]["addr_info"] if a["family"] == "inet"]
        assert inet == [f"198.18.0.{host + 1}"]
        assert ipaddress.ip_address(inet[0]) in BENCHMARK_RANGE
        qdisc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev",
                                "veth0"], capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdisc and "10Mbit" in qdisc
        port = subprocess.run(["ip", "netns", "exec", f"{prefix}-br", "tc", "qdisc", "show",
                               "dev", f"p{host}"], capture_output=True, text=True,
                              check=True).stdout
        assert "tbf" in port and "10Mbit" in port
    # Namespaces left by an earlier run (no process inside) are replaced, not refused.
    again = netem("up", "2", "20mbit")
    assert again.returncode == 0 and "removing stale namespaces" in again.stderr
    assert len(_namespaces(prefix)) == 3
    assert netem("down").returncode == 0
    assert _namespaces(prefix) == []


@needs_netns
def test_shaper_bucket_is_one_ms_and_offloads_are_off(netem):
    # 11.8 Mbit/s (the protocol's R = 16 rate): 1 ms is 1475 bytes, less than a frame, so
    # the bucket is one 1514-byte frame plus tc's rounding room; at 1 Gbit/s it is 1 ms.
    for rate, bits in (("11800kbit", 11.8e6), ("1gbit", 1e9)):
        assert netem("up", "2", rate).returncode == 0
        frame = 1500 + 14
        for ns, dev in ((f"{netem.prefix}-h0", "veth0"), (f"{netem.prefix}-br", "p0")):
            (qdisc,) = json.loads(subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "-j", "qdisc", "show", "dev", dev],
                capture_output=True, text=True, check=True).stdout)
            assert qdisc["kind"] == "tbf"
            burst = qdisc["options"]["burst"]
            assert frame <= burst <= max(bits / 8e3, frame + 64) * 1.01, (rate, burst)
            features = subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-k", dev],
                                      capture_output=True, text=True, check=True).stdout
            for feature in ("tcp-segmentation-offload", "generic-segmentation-offload",
                            "generic-receive-offload"):
                assert f"{feature}: off" in features, (ns, dev, feature)


@needs_netns
@pytest.mark.timeout(90)
def test_small_and_large_transfers_take_the_time_the_rate_implies(netem):
    # 64 KiB and 4 MiB, each after an idle pause (a full bucket), host 1 -> host 0 at
    # 20 Mbit/s: 27 ms and 1.75 s for the frames on the wire. A bucket that passes 128 KiB
    # at line speed (the shaper before offloads were turned off) delivered the 64 KiB in
    # under a millisecond. 15% covers the 1 ms bucket (4% of 27 ms) and a shared machine.
    result = netem("run", "--timeout", "60", "2", "20mbit", "--", sys.executable, str(CHECK),
                   "--transfer", "65536", "4194304", "--repeats", "3", "--timeout", "30",
                   timeout=75)
    assert result.returncode == 0, result.stderr
    reports = {r["bytes"]: r for r in map(json.loads, result.stdout.strip().splitlines())}
    assert set(reports) == {65536, 4194304}
    for size, report in reports.items():
        assert report["predicted_seconds"] == pytest.approx(  # reported to 10 us
            report["wire_bytes"] * 8 / 20e6, abs=1e-5), size
        assert report["ratio"] == pytest.approx(1.0, abs=0.15), report


def test_wire_bytes_count_one_header_per_segment():
    check = _check_module()
    # MSS 1448 (timestamps on), frame 1514: 66 bytes of headers per segment.
    assert check.wire_bytes(1448, 1448, 1514) == 1514
    assert check.wire_bytes(1449, 1448, 1514) == 1449 + 2 * 66
    assert check.wire_bytes(65536, 1448, 1514) == 65536 + 46 * 66


@pytest.mark.skipif(_NETNS_MISSING is not None, reason=str(_NETNS_MISSING))
def test_missing_ethtool_is_named(tmp_path):
    # Every tool on PATH except ethtool, so netem.sh gets past its root and iproute2
    # checks and stops at ethtool, before building anything.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin",
                   "/bin"):
        for tool in Path(folder).glob("*") if Path(folder).is_dir() else []:
            link = bin_dir / tool.name
            if tool.name != "ethtool" and not link.exists():
                link.symlink_to(tool)
    prefix = f"distk-noeth{os.getpid()}"
    env = {**os.environ, "PATH": str(bin_dir), "DISTK_NETEM_PREFIX": prefix}
    for args in (["up", "2", "1gbit"], ["run", "2", "1gbit", "--", "true"]):
        result = subprocess.run(["bash", str(NETEM), *args], env=env, capture_output=True,
                                text=True, timeout=20)
        assert result.returncode == 2, result.stderr
        assert "'ethtool' not found" in result.stderr
        assert "apt-get install ethtool" in result.stderr
    assert _namespaces(prefix) == []


@needs_netns
def test_allreduce_is_rate_limited(netem):
    # 3 MB all-reduced by 2 ranks: each sends 3 MB at 50 Mbit/s -> 0.48 s predicted; an
    # unlimited veth does it in a few ms. At least half the prediction proves the limit
    # applies (the upper side is left loose: the machine is shared).
    result = netem("run", "--timeout", "40", "2", "50mbit", "--", sys.executable, str(CHECK),
                   "--mb", "3", "--repeats", "1", "--min-ratio", "0.5", "--timeout", "30",
                   timeout=50)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["correct"] and report["world_size"] == 2
    assert report["predicted_seconds"] == pytest.approx(0.48)
    assert report["seconds_median"] >= 0.5 * report["predicted_seconds"]


@needs_netns
@pytest.mark.timeout(60)
def test_run_writes_each_links_byte_counters(netem, tmp_path):
    # Host 1 sends 1 MB twice to host 0 over TCP (netem_check --transfer): its link's tx
    # counter (read by netem.sh before the teardown into LOG_DIR/wire.tsv) holds those
    # frames, headers included, plus a few kB of handshakes and ACKs; host 0's rx sees the
    # same frames; host 0 sends only ACKs and 1-byte replies.
    logs = tmp_path / "logs"
    result = netem("run", "--timeout", "40", "--log-dir", str(logs), "2", "1gbit", "--",
                   sys.executable, str(CHECK), "--transfer", "1000000", "--repeats", "2",
                   "--idle", "0", "--timeout", "30", timeout=50)
    assert result.returncode == 0, result.stderr
    report = json.loads((logs / "h1.log").read_text().strip().splitlines()[-1])
    sent = 2 * report["wire_bytes"]
    lines = [line.split() for line in (logs / "wire.tsv").read_text().splitlines()
             if not line.startswith("#")]
    counters = {host: (int(tx), int(rx)) for host, tx, rx in lines}
    assert set(counters) == {"h0", "h1"}
    assert sent <= counters["h1"][0] <= sent + 64_000, (counters, sent)
    assert sent <= counters["h0"][1] <= sent + 64_000, (counters, sent)
    assert counters["h0"][0] < 0.1 * sent, counters


@needs_netns
def test_run_sets_rank_environment(netem):
    script = ('echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $GLOO_SOCKET_IFNAME"; '
              'ip -o -4 addr show dev "$GLOO_SOCKET_IFNAME" | grep -c "198.18.0.$((RANK + 1))/"')
    result = netem("run", "2", "1gbit", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.split("\n"))
    assert "0 2 0 198.18.0.1 veth0" in lines and "1 2 0 198.18.0.1 veth0" in lines
    assert lines.count("1") == 2  # each rank's interface carries its own address


@needs_netns
def test_failure_propagates_and_stops_other_ranks(netem):
    marker = f"distk-netem-sleeper-{os.getpid()}"
    script = f'if [ "$RANK" = 1 ]; then exit 3; fi; exec -a {marker} sleep 60'
    start = time.monotonic()
    result = netem("run", "3", "1gbit", "--", "bash", "-c", script)
    assert result.returncode == 3, result.stderr
    assert "host 1 exited with status 3" in result.stderr
    assert time.monotonic() - start < 20  # the sleepers were stopped, not waited for
    assert marker not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                        text=True).stdout
    assert _namespaces(netem.prefix) == []


@needs_netns
def test_timeout_stops_everything(netem):
    result = netem("run", "--timeout", "1", "2", "none", "--", "sleep", "60")
    assert result.returncode == 124
    assert "timeout after 1s" in result.stderr
    assert _namespaces(netem.prefix) == []


@needs_netns
def test_interrupt_tears_down_and_busy_prefix_is_refused(netem):
    env = {**os.environ, "DISTK_NETEM_PREFIX": netem.prefix}
    # SIGINT back to its default in the child: a shell started in the background (as CI
    # may start pytest) ignores SIGINT, and bash cannot trap a signal ignored on entry.
    proc = subprocess.Popen(["bash", str(NETEM), "run", "2", "1gbit", "--", "sleep", "60"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 15
    while len(_namespaces(netem.prefix)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # let the ranks start
    # A second run under the same prefix must refuse, not tear down the live one.
    second = netem("up", "2", "1gbit")
    assert second.returncode == 3 and "in use by running processes" in second.stderr
    assert len(_namespaces(netem.prefix)) == 3 and proc.poll() is None
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert _namespaces(netem.prefix) == []


@needs_netns
def test_bad_arguments_are_named(netem):
    result = netem("up", "2", "fast")
    assert result.returncode == 2 and "RATE=fast is invalid" in result.stderr
    result = netem("up", "0", "1gbit")
    assert result.returncode == 2 and "N=0 is invalid" in result.stderr
    result = netem("run", "2", "1gbit", "sleep", "1")
    assert result.returncode == 2 and "missing '--'" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (to drop to an unprivileged user) and setpriv")
def test_non_root_gets_a_clear_message():
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "bash", str(NETEM), "up", "2", "1gbit"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert "must run as root" in result.stderr


@needs_netns
def test_outer_sync_bytes_on_the_wire_match_the_count(netem, tmp_path):
    # benchmarks/wire.py's outer method at 3 ranks (SparseLoCo's recipe, a sync every 4
    # steps, 2 syncs measured): what each host's veth0 sent is distk's count plus the
    # headers (and the ACKs of what it received: up to about 15% on these small
    # messages), and a rank sends its payload to each of the 2 others: distk counts
    # under 2 x 0.25 bits per parameter per sync.
    part = tmp_path / "outer"
    result = netem("run", "--timeout", "100", "3", "1gbit", "--", sys.executable,
                   str(ROOT / "benchmarks" / "wire.py"), "--part", str(part), "--methods",
                   "outer", "--warmup", "4", "--steps", "8", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(part.with_suffix(".json").read_text())
    assert sorted(r["rank"] for r in rows) == [0, 1, 2]
    for row in rows:
        assert row["schemes"] == {"allgather": 6}
        assert 1.0 < row["wire_bytes_per_step"] / row["counted_bytes_per_step"] < 1.25, row
        assert 0.4 < row["counted_bits_per_param_per_sync"] < 0.5, row


@needs_netns
def test_coalesced_exchanges_send_less_on_the_wire(netem, tmp_path):
    # benchmarks/coalesce.py at 3 ranks: 32 exchanges of 1 KB, one collective each or
    # coalesced (distk.comm.coalesced), read on each host's veth0. One collective per
    # tensor costs KBs of messages and headers beyond its payload; coalesced, the wire
    # carries little more than the ring's payload.
    part = tmp_path / "coalesce"
    result = netem("run", "--timeout", "100", "3", "1gbit", "--", sys.executable,
                   str(ROOT / "benchmarks" / "coalesce.py"), "--part", str(part),
                   "--tensors", "32", "--bytes", "1024", "--repeats", "3", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {(r["kind"], r["mode"]): r for r in json.loads(part.with_suffix(".json").read_text())}
    assert len(rows) == 4
    for kind in ("all_gather", "all_reduce"):
        separate, together = rows[kind, "separate"], rows[kind, "coalesced"]
        assert separate["payload_bytes"] == together["payload_bytes"] > 0
        assert separate["wire_bytes"] > 1.3 * separate["payload_bytes"], separate
        assert together["wire_bytes"] < 1.25 * together["payload_bytes"], together
        assert together["wire_bytes"] < 0.8 * separate["wire_bytes"], (separate, together)
