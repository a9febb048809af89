"""The guest agent client (crosvm.agent): its parser against canned answers, and the real
guest/agent.sh run by the host's busybox (the same static binary the guest runs)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from crosvm.agent import AgentError, GuestAgent
from tests.guest_vm import REPO

BUSYBOX = "/bin/busybox"
AGENT = os.path.join(REPO, "guest", "agent.sh")


class CannedGuest:
    """The guest end of a channel as two pipes: the test writes the agent's answers."""

    def __init__(self) -> None:
        self._from_r, self._from_w = os.pipe()
        self._to_r, self._to_w = os.pipe()
        self.channel = GuestAgent(self._from_r, self._to_w)

    def answer(self, data: bytes) -> None:
        os.write(self._from_w, data)

    def hang_up(self) -> None:
        if self._from_w >= 0:
            os.close(self._from_w)   # the reader thread sees end of file and stops
            self._from_w = -1

    def close(self) -> None:
        self.hang_up()
        self.channel.join(10)
        for fd in (self._from_r, self._to_r, self._to_w):
            os.close(fd)


@pytest.fixture
def canned():
    guest = CannedGuest()
    yield guest
    guest.close()


def test_run_skips_the_answer_to_a_command_sent_earlier(canned):
    channel = canned.channel
    canned.answer(b"@@BEGIN 1\nO:stale\n@@END 1 0\n@@BEGIN 2\nO:fresh\n@@END 2 0\n")

    channel.send("echo stale")
    result = channel.run("echo fresh", timeout=10)

    assert result.stdout == "fresh\n"


def test_run_keeps_carriage_returns(canned):
    channel = canned.channel
    canned.answer(b"@@BEGIN 1\nO:a\r\nO-:b\r\n@@END 1 0\n")

    result = channel.run("printf 'a\\r\\nb\\r'", timeout=10)

    assert result.stdout == "a\r\nb\r"


def test_run_keeps_undecodable_bytes_as_surrogate_escapes(canned):
    channel = canned.channel
    canned.answer(b"@@BEGIN 1\nO:\xff\xfe\n@@END 1 0\n")

    result = channel.run("printf '\\377\\376\\n'", timeout=10)

    assert result.stdout.encode(errors="surrogateescape") == b"\xff\xfe\n"


def test_run_rejects_a_line_outside_the_protocol(canned):
    channel = canned.channel
    canned.answer(b"@@BEGIN 1\nnot framed\n@@END 1 0\n")

    with pytest.raises(AgentError, match="unexpected line 'not framed'"):
        channel.run("true", timeout=10)


def test_run_fails_when_the_agent_end_closes(canned):
    canned.answer(b"@@BEGIN 1\nO:half")
    canned.hang_up()

    with pytest.raises(AgentError, match="agent gone"):
        canned.channel.run("true", timeout=10)


@pytest.fixture
def agent(tmp_path):
    """guest/agent.sh serving over a socketpair, under the host's busybox."""
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} not found: install busybox-static (scripts/setup.sh)")
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [BUSYBOX, "sh", "-c", '. "$0"; agent_serve "$1" 3<&0 </dev/null', AGENT, str(tmp_path)],
        stdin=guest, stdout=subprocess.DEVNULL, cwd=tmp_path)
    guest.close()
    channel = GuestAgent(host.fileno(), host.fileno(), exited=lambda: proc.poll() is not None)
    channel.wait_ready(timeout=30)
    yield channel
    host.shutdown(socket.SHUT_RDWR)   # end of file on fd 3 ends agent_serve
    proc.wait(30)
    host.close()


def test_agent_answers_partial_last_lines_stderr_and_status(agent):
    result = agent.run("printf 'o1\\no2'; printf 'e1\\ne2' >&2; exit 3", timeout=30)

    assert (result.stdout, result.stderr, result.returncode) == ("o1\no2", "e1\ne2", 3)


def test_agent_answers_a_silent_command_with_empty_output(agent):
    result = agent.run("true", timeout=30)

    assert (result.stdout, result.stderr, result.returncode) == ("", "", 0)


def test_agent_keeps_every_byte_but_nul(agent):
    expected = bytes(range(1, 256)).replace(b"\n", b"") + b"\n  spaces \\t \r\nlast\r"
    command = "printf '" + "".join(f"\\{b:03o}" for b in expected) + "'"

    result = agent.run(command, timeout=30)

    assert result.stdout.encode(errors="surrogateescape") == expected


def test_agent_answers_thousands_of_interleaved_lines_in_order(agent):
    command = 'i=0; while [ $i -lt 3000 ]; do echo "o$i"; echo "e$i" >&2; i=$((i+1)); done'

    result = agent.run(command, timeout=60)

    assert result.stdout == "".join(f"o{i}\n" for i in range(3000))
    assert result.stderr == "".join(f"e{i}\n" for i in range(3000))


def test_agent_commands_cannot_write_into_the_channel(agent):
    result = agent.run("echo '@@END 1 0' >&3", timeout=30)

    assert result.returncode != 0
    assert result.stdout == ""


def test_agent_answers_in_order_after_unanswered_sends(agent):
    agent.send("echo one")
    agent.send("echo two")

    result = agent.run("echo three", timeout=30)

    assert result.stdout == "three\n"


def test_wait_for_prints_the_first_line_containing_the_text(agent, tmp_path):
    (tmp_path / "devices").write_text('N: Name="Power Button"\nN: Name="AT keyboard"\n')

    result = agent.run("wait_for devices keyboard 5", timeout=30)

    assert (result.stdout, result.returncode) == ('N: Name="AT keyboard"\n', 0)


def test_wait_for_sees_a_line_that_appears_later(agent, tmp_path):
    result = agent.run("(sleep 2; echo late > later) & wait_for later late 20", timeout=60)

    assert (result.stdout, result.returncode) == ("late\n", 0)


def test_wait_for_gives_up_after_its_deadline(agent):
    result = agent.run("wait_for /nonexistent keyboard 1", timeout=30)

    assert result.returncode == 1
    assert "no line with 'keyboard' in /nonexistent after 1 s" in result.stderr
