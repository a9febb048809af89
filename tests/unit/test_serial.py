"""16550A register behaviour."""

from crosvm.devices import serial as S


class Irq:
    def __init__(self):
        self.count = 0

    def signal(self):
        self.count += 1


class Out:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


def make():
    irq, out = Irq(), Out()
    return S.Serial(irq, out), irq, out


def rd(dev, offset):
    buf = bytearray(1)
    dev.read(offset, 0x3F8 + offset, memoryview(buf))
    return buf[0]


def wr(dev, offset, value):
    dev.write(offset, 0x3F8 + offset, bytes([value]))


def test_thr_write_goes_to_output():
    dev, _, out = make()

    wr(dev, S.DATA, ord("A"))
    dev.flush()

    assert out.data == b"A"


def test_lsr_reports_transmitter_empty():
    dev, _, _ = make()

    assert rd(dev, S.LSR) & (S.LSR_EMPTY_BIT | S.LSR_IDLE_BIT) == 0x60


def test_dlab_redirects_data_and_ier_to_divisor():
    dev, _, out = make()
    wr(dev, S.LCR, S.LCR_DLAB_BIT)

    wr(dev, S.DATA, 0x01)
    wr(dev, S.IER, 0x02)

    assert rd(dev, S.DATA) == 0x01
    assert rd(dev, S.IER) == 0x02
    assert dev.baud_divisor == 0x0201
    dev.flush()
    assert out.data == b""


def test_ier_keeps_only_four_bits():
    dev, _, _ = make()

    wr(dev, S.IER, 0xFF)

    assert rd(dev, S.IER) == 0x0F


def test_enabling_thr_interrupt_raises_it_at_once():
    dev, irq, _ = make()

    wr(dev, S.IER, S.IER_THR_BIT)

    assert irq.count == 1
    assert rd(dev, S.IIR) & 0x0F == S.IIR_THR_BIT


def test_reading_iir_acknowledges_thr_interrupt():
    dev, _, _ = make()
    wr(dev, S.IER, S.IER_THR_BIT)

    rd(dev, S.IIR)

    assert rd(dev, S.IIR) & 0x0F == S.IIR_NONE_BIT


def test_write_with_thr_interrupt_enabled_signals_again():
    dev, irq, _ = make()
    wr(dev, S.IER, S.IER_THR_BIT)

    wr(dev, S.DATA, ord("x"))

    assert irq.count == 2


def test_input_sets_data_ready_and_interrupts_when_enabled():
    dev, irq, _ = make()
    wr(dev, S.IER, S.IER_RECV_BIT)

    dev.queue_input_bytes(b"hi")

    assert irq.count == 1
    assert rd(dev, S.LSR) & S.LSR_DATA_BIT
    assert rd(dev, S.IIR) & 0x0F == S.IIR_RECV_BIT
    assert bytes([rd(dev, S.DATA), rd(dev, S.DATA)]) == b"hi"
    assert not rd(dev, S.LSR) & S.LSR_DATA_BIT


def test_input_without_receive_interrupt_enabled_does_not_interrupt():
    dev, irq, _ = make()

    dev.queue_input_bytes(b"x")

    assert irq.count == 0


def test_fcr_enables_fifo_bits_in_iir():
    dev, _, _ = make()

    wr(dev, S.FCR, S.FCR_FIFO_ENABLE)

    assert rd(dev, S.IIR) & S.IIR_FIFO_BITS == S.IIR_FIFO_BITS


def test_fcr_clear_rx_drops_pending_input():
    dev, _, _ = make()
    dev.queue_input_bytes(b"abc")

    wr(dev, S.FCR, S.FCR_FIFO_ENABLE | S.FCR_CLEAR_RX)

    assert not rd(dev, S.LSR) & S.LSR_DATA_BIT


def test_loopback_returns_written_byte_and_not_output():
    dev, _, out = make()
    wr(dev, S.MCR, S.MCR_LOOP_BIT)

    wr(dev, S.DATA, 0x5A)

    assert rd(dev, S.DATA) == 0x5A
    dev.flush()
    assert out.data == b""


def test_loopback_msr_mirrors_mcr_outputs():
    dev, _, _ = make()

    wr(dev, S.MCR, S.MCR_LOOP_BIT | S.MCR_OUT2_BIT | S.MCR_RTS_BIT)

    assert rd(dev, S.MSR) & 0xF0 == S.MSR_DCD_BIT | S.MSR_CTS_BIT


def test_msr_without_loopback_reports_carrier():
    dev, _, _ = make()

    assert rd(dev, S.MSR) == S.MSR_DCD_BIT | S.MSR_DSR_BIT | S.MSR_CTS_BIT


def test_scratch_register_holds_value():
    dev, _, _ = make()

    wr(dev, S.SCR, 0xA5)

    assert rd(dev, S.SCR) == 0xA5


def test_multi_byte_access_is_ignored():
    dev, _, out = make()

    dev.write(S.DATA, 0x3F8, b"ab")

    dev.flush()
    assert out.data == b""


class BlockedOut:
    """A sink that blocks until released, like a pipe nobody reads."""

    def __init__(self):
        import threading
        self.release = threading.Event()
        self.data = bytearray()

    def write(self, data):
        self.release.wait()
        self.data += data


def fill_until_thre_clears(dev, limit=2 * S.OUTPUT_BUFFER_LIMIT):
    written = 0
    while rd(dev, S.LSR) & S.LSR_EMPTY_BIT and written < limit:
        wr(dev, S.DATA, ord("x"))
        written += 1
    return written


def interrupt_driven(out):
    """A UART whose driver waits for the THR interrupt (the tty path, not the console)."""
    dev = S.Serial(Irq(), out)
    wr(dev, S.IER, S.IER_THR_BIT)
    return dev


def test_blocked_sink_does_not_block_guest_writes_and_clears_thre():
    out = BlockedOut()
    dev = interrupt_driven(out)

    written = fill_until_thre_clears(dev)

    # The buffer, plus what the writer thread took before it blocked.
    assert S.OUTPUT_BUFFER_LIMIT - S.TX_FIFO_SIZE <= written < 2 * S.OUTPUT_BUFFER_LIMIT
    out.release.set()
    dev.close()


def test_output_held_by_a_blocked_sink_arrives_once_it_reads():
    out = BlockedOut()
    dev = interrupt_driven(out)
    written = fill_until_thre_clears(dev)

    out.release.set()
    drained = dev.flush(5.0)

    assert (drained, len(out.data), rd(dev, S.LSR) & S.LSR_EMPTY_BIT) == (
        True, written, S.LSR_EMPTY_BIT)


def test_thr_interrupt_returns_when_a_blocked_sink_drains():
    out, irq = BlockedOut(), Irq()
    dev = S.Serial(irq, out)
    wr(dev, S.IER, S.IER_THR_BIT)
    fill_until_thre_clears(dev)
    before = irq.count

    out.release.set()
    dev.flush(5.0)

    assert irq.count == before + 1
    assert rd(dev, S.IIR) & 0x0F == S.IIR_THR_BIT


def test_byte_written_while_output_buffer_is_full_is_dropped():
    out = BlockedOut()
    dev = interrupt_driven(out)
    written = fill_until_thre_clears(dev)
    for _ in range(S.TX_FIFO_SIZE + 10):  # a driver that ignores THRE
        wr(dev, S.DATA, ord("y"))

    out.release.set()
    dev.flush(5.0)

    # Every byte either reached the sink or was counted as dropped.
    assert dev._dropped >= 10
    assert len(out.data) + dev._dropped == written + S.TX_FIFO_SIZE + 10


def test_loopback_input_is_bounded():
    dev, _, _ = make()
    wr(dev, S.MCR, S.MCR_LOOP_BIT)

    for _ in range(S.INPUT_BUFFER_LIMIT + 100):
        wr(dev, S.DATA, ord("z"))

    assert len(dev._in) == S.INPUT_BUFFER_LIMIT


def test_polling_writer_is_released_after_a_stalled_sink_and_its_bytes_are_counted():
    import time
    out = BlockedOut()
    dev = S.Serial(Irq(), out)   # THR interrupt off: the kernel console's busy-wait
    wr(dev, S.DATA, ord("x"))    # the writer takes it and blocks in the sink
    while dev._output.stalled_for() == 0:
        time.sleep(0.001)
    dev._output.put(bytes(S.OUTPUT_BUFFER_LIMIT))  # then the buffer fills
    full = not rd(dev, S.LSR) & S.LSR_EMPTY_BIT

    time.sleep(S.POLLED_STALL_LIMIT * 2)
    released = bool(rd(dev, S.LSR) & S.LSR_EMPTY_BIT)
    for _ in range(100):
        wr(dev, S.DATA, ord("p"))

    assert (full, released, dev._dropped) == (True, True, 100)
    out.release.set()
    dev.close()
