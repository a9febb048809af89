"""CMOS RTC, i8042 and ACPI PM register behaviour."""

import calendar

from crosvm.arch.x86_64.acpi import SLP_TYP_S5, PmPorts
from crosvm.devices import cmos as C
from crosvm.devices import i8042 as K
from crosvm.devices.acpi import PM1_CNT_SCI_EN, PM1_CNT_SLP_EN, AcpiPm

# 2026-11-21 06:07:08 UTC, a Saturday.
T = calendar.timegm((2026, 11, 21, 6, 7, 8, 0, 0, 0))


def cmos_read(dev, reg):
    dev.write(0, 0x70, bytes([reg]))
    buf = bytearray(1)
    dev.read(1, 0x71, memoryview(buf))
    return buf[0]


def test_cmos_time_registers_are_bcd_utc():
    dev = C.Cmos(256 << 20, 0, clock=lambda: T + 0.5)

    values = [cmos_read(dev, r) for r in (C.RTC_SECONDS, C.RTC_MINUTES, C.RTC_HOURS,
                                           C.RTC_DAY, C.RTC_MONTH, C.RTC_YEAR, C.RTC_CENTURY)]

    assert values == [0x08, 0x07, 0x06, 0x21, 0x11, 0x26, 0x20]


def test_cmos_weekday_sunday_is_one():
    dev = C.Cmos(256 << 20, 0, clock=lambda: T)

    assert cmos_read(dev, C.RTC_WEEKDAY) == 7   # Saturday


def test_cmos_binary_mode():
    dev = C.Cmos(256 << 20, 0, clock=lambda: T)
    dev.write(0, 0x70, bytes([C.RTC_REG_B]))
    dev.write(1, 0x71, bytes([C.REG_B_24H | C.REG_B_BINARY]))

    assert cmos_read(dev, C.RTC_DAY) == 21


def test_cmos_update_in_progress_just_before_second_boundary():
    late = C.Cmos(0, 0, clock=lambda: T + 0.9999)
    early = C.Cmos(0, 0, clock=lambda: T + 0.5)

    assert cmos_read(late, C.RTC_REG_A) & C.REG_A_UIP
    assert not cmos_read(early, C.RTC_REG_A) & C.REG_A_UIP


def test_cmos_nvram_round_trips():
    dev = C.Cmos(0, 0)
    dev.write(0, 0x70, bytes([0x40]))
    dev.write(1, 0x71, b"\x99")

    assert cmos_read(dev, 0x40) == 0x99


def test_cmos_index_ignores_nmi_bit():
    dev = C.Cmos(0, 0)
    dev.write(0, 0x70, bytes([0x80 | 0x40]))
    dev.write(1, 0x71, b"\x12")

    assert cmos_read(dev, 0x40) == 0x12


def test_cmos_reports_memory_above_4g_in_64k_units():
    dev = C.Cmos(0xD000_0000, 1 << 30)

    assert (cmos_read(dev, 0x5B), cmos_read(dev, 0x5C), cmos_read(dev, 0x5D)) == (0, 0x40, 0)


class Irq:
    def __init__(self):
        self.count = 0

    def signal(self):
        self.count += 1


def kbd(reset=lambda: None):
    return K.I8042(reset, Irq())


def cmd(dev, value):
    dev.write(0, K.COMMAND_PORT, bytes([value]))


def data_out(dev, value):
    dev.write(0, K.DATA_PORT, bytes([value]))


def data_in(dev):
    buf = bytearray(1)
    dev.read(0, K.DATA_PORT, memoryview(buf))
    return buf[0]


def status(dev):
    buf = bytearray(1)
    dev.read(0, K.COMMAND_PORT, memoryview(buf))
    return buf[0]


def test_i8042_reset_command_pulses_reset():
    calls = []
    dev = kbd(lambda: calls.append(1))

    cmd(dev, K.CMD_RESET)

    assert calls == [1]


def test_i8042_self_test_answers_55():
    dev = kbd()

    cmd(dev, K.CMD_SELF_TEST)

    assert status(dev) & K.STR_OBF
    assert data_in(dev) == 0x55
    assert not status(dev) & K.STR_OBF


def test_i8042_ctr_write_then_read():
    dev = kbd()
    cmd(dev, K.CMD_WRITE_CTR)
    data_out(dev, 0x45)

    cmd(dev, K.CMD_READ_CTR)

    assert data_in(dev) == 0x45


def test_i8042_keyboard_getid_acks_and_interrupts():
    dev = kbd()

    data_out(dev, K.KBD_GETID)

    assert [data_in(dev), data_in(dev), data_in(dev)] == [K.KBD_ACK, 0xAB, 0x83]
    assert dev._irq.count >= 1


def test_i8042_output_port_write_with_reset_bit_clear_resets():
    calls = []
    dev = kbd(lambda: calls.append(1))
    cmd(dev, K.CMD_WRITE_OUTPUT)

    data_out(dev, 0x00)

    assert calls == [1]


def pm():
    events = []
    dev = AcpiPm(PmPorts(), lambda: events.append("off"), lambda: events.append("reset"))
    return dev, events


def test_pm1_control_s5_sleep_powers_off():
    dev, events = pm()
    value = PM1_CNT_SLP_EN | (SLP_TYP_S5 << 10)

    dev.write(0, PmPorts().pm1_cnt, value.to_bytes(2, "little"))

    assert events == ["off"]


def test_pm1_control_other_sleep_type_does_not_power_off():
    dev, events = pm()

    dev.write(0, PmPorts().pm1_cnt, (PM1_CNT_SLP_EN | (1 << 10)).to_bytes(2, "little"))

    assert events == []


def test_pm1_control_reads_sci_enabled():
    dev, _ = pm()
    buf = bytearray(2)

    dev.read(0, PmPorts().pm1_cnt, memoryview(buf))

    assert int.from_bytes(buf, "little") & PM1_CNT_SCI_EN


def test_reset_register_value_resets():
    dev, events = pm()

    dev.write(0, 0xCF9, bytes([PmPorts().reset_value]))

    assert events == ["reset"]


def test_pm1_status_is_write_one_to_clear():
    dev, _ = pm()
    dev.regs[0] = 0x01
    dev.regs[1] = 0x81

    dev.write(0, PmPorts().pm1_evt, b"\x01\x00")

    assert dev.regs[0:2] == b"\x00\x81"
