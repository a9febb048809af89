"""virtio-net wire formats: vnet headers, offload flags, MACs and control commands."""

from __future__ import annotations

import struct

import pytest

from crosvm.devices.virtio import net_proto as P

TSO4_ACKED = 1 << P.F_CSUM | 1 << P.F_HOST_TSO4


def test_tx_header_with_tso4_is_accepted_when_negotiated():
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 54, 1448, 34, 16)

    P.check_tx_header(hdr, 60000, TSO4_ACKED)


def test_tx_header_with_tso4_is_refused_when_not_negotiated():
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 54, 1448, 34, 16)

    with pytest.raises(P.HeaderError, match="not negotiated"):
        P.check_tx_header(hdr, 60000, 1 << P.F_CSUM)


def test_tx_header_needs_csum_without_csum_feature_is_refused():
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)

    with pytest.raises(P.HeaderError, match="VIRTIO_NET_F_CSUM"):
        P.check_tx_header(hdr, 100, 0)


def test_tx_header_checksum_past_the_frame_is_refused():
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, csum_start=90, csum_offset=16)

    with pytest.raises(P.HeaderError, match="past the frame"):
        P.check_tx_header(hdr, 100, 1 << P.F_CSUM)


def test_tx_header_unknown_gso_type_is_refused():
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, 7, 54, 1448, 34, 16)

    with pytest.raises(P.HeaderError, match="unknown GSO type"):
        P.check_tx_header(hdr, 1000, TSO4_ACKED)


def test_tx_header_gso_with_zero_segment_size_is_refused():
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 54, 0, 34, 16)

    with pytest.raises(P.HeaderError, match="segment size"):
        P.check_tx_header(hdr, 1000, TSO4_ACKED)


def test_tx_header_gso_with_a_tiny_segment_size_is_refused():
    hdr = P.VnetHeader(P.HDR_F_NEEDS_CSUM, P.GSO_TCPV4, 54, 1, 34, 16)

    with pytest.raises(P.HeaderError, match="segment size of 1"):
        P.check_tx_header(hdr, 60000, TSO4_ACKED)


def test_tx_header_with_data_valid_is_refused():
    hdr = P.VnetHeader(P.HDR_F_DATA_VALID)

    with pytest.raises(P.HeaderError, match="not allowed on transmit"):
        P.check_tx_header(hdr, 1000, TSO4_ACKED)


def test_tx_frame_longer_than_the_maximum_is_refused():
    with pytest.raises(P.HeaderError, match="longer than"):
        P.check_tx_header(P.VnetHeader(), P.MAX_FRAME_LEN + 1, 0)


def test_vnet_header_shorter_than_12_bytes_is_refused():
    with pytest.raises(P.HeaderError, match="12 bytes"):
        P.VnetHeader.unpack(bytes(10))


def test_vnet_header_round_trips():
    hdr = P.VnetHeader(1, P.GSO_TCPV4, 54, 1448, 34, 16, 3)

    assert P.VnetHeader.unpack(hdr.pack()) == hdr


def test_tap_offloads_are_none_without_guest_csum():
    acked = 1 << P.F_GUEST_TSO4 | 1 << P.F_GUEST_UFO

    assert P.tap_offload_flags(acked) == 0


def test_tap_offloads_follow_guest_csum_tso4_and_ufo():
    acked = 1 << P.F_GUEST_CSUM | 1 << P.F_GUEST_TSO4 | 1 << P.F_GUEST_UFO

    assert P.tap_offload_flags(acked) == P.TUN_F_CSUM | P.TUN_F_TSO4 | P.TUN_F_UFO


def test_tap_offload_ecn_needs_a_tso_offload():
    acked = 1 << P.F_GUEST_CSUM | 1 << P.F_GUEST_ECN

    assert P.tap_offload_flags(acked) == P.TUN_F_CSUM


def test_parse_mac_reads_six_hex_pairs():
    assert P.parse_mac("52:54:00:12:34:5a") == bytes.fromhex("52540012345a")


@pytest.mark.parametrize("text", ["52:54:00:12:34", "52:54:00:12:34:zz", "525400123456",
                                  "52:54:00:12:34:5:6"])
def test_parse_mac_rejects_malformed_addresses(text):
    with pytest.raises(ValueError, match="invalid MAC"):
        P.parse_mac(text)


def test_parse_mac_accepts_a_multicast_address_as_crosvm_does():
    assert P.parse_mac("01:00:5e:00:00:01") == bytes.fromhex("01005e000001")


@pytest.mark.parametrize("tap_mtu, told", [(9000, 9000), (1280, 1280), (None, 1500),
                                           (20, P.MIN_MTU), (1 << 20, P.MAX_MTU)])
def test_net_mtu_is_the_taps_within_what_the_device_frames(tap_mtu, told):
    assert P.net_mtu(tap_mtu) == told


def test_config_bytes_hold_mac_status_pairs_and_mtu():
    raw = P.config_bytes(bytes.fromhex("52540012345a"), True, 2, 1500)

    assert struct.unpack("<6sHHH", raw) == (bytes.fromhex("52540012345a"), P.S_LINK_UP, 2, 1500)


def test_control_request_without_command_byte_is_refused():
    with pytest.raises(P.HeaderError, match="no class/command"):
        P.parse_ctrl(b"\x04")


def test_vq_pairs_set_within_range_is_accepted():
    cmd = P.parse_ctrl(bytes([P.CLASS_MQ, P.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2))

    assert P.mq_pairs_requested(cmd, 2) == 2


@pytest.mark.parametrize("pairs", [0, 3, 0xFFFF])
def test_vq_pairs_set_outside_range_is_refused(pairs):
    cmd = P.parse_ctrl(bytes([P.CLASS_MQ, P.MQ_VQ_PAIRS_SET]) + struct.pack("<H", pairs))

    with pytest.raises(P.HeaderError, match="outside"):
        P.mq_pairs_requested(cmd, 2)


def test_vq_pairs_set_with_a_short_payload_is_refused():
    cmd = P.parse_ctrl(bytes([P.CLASS_MQ, P.MQ_VQ_PAIRS_SET, 2]))

    with pytest.raises(P.HeaderError, match="payload"):
        P.mq_pairs_requested(cmd, 2)
