"""The Linux x86 boot protocol's zero page (`struct boot_params`, bootparam.h)."""

from __future__ import annotations

import ctypes as C


class setup_header(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", C.c_uint8),
        ("root_flags", C.c_uint16),
        ("syssize", C.c_uint32),
        ("ram_size", C.c_uint16),
        ("vid_mode", C.c_uint16),
        ("root_dev", C.c_uint16),
        ("boot_flag", C.c_uint16),
        ("jump", C.c_uint16),
        ("header", C.c_uint32),
        ("version", C.c_uint16),
        ("realmode_swtch", C.c_uint32),
        ("start_sys_seg", C.c_uint16),
        ("kernel_version", C.c_uint16),
        ("type_of_loader", C.c_uint8),
        ("loadflags", C.c_uint8),
        ("setup_move_size", C.c_uint16),
        ("code32_start", C.c_uint32),
        ("ramdisk_image", C.c_uint32),
        ("ramdisk_size", C.c_uint32),
        ("bootsect_kludge", C.c_uint32),
        ("heap_end_ptr", C.c_uint16),
        ("ext_loader_ver", C.c_uint8),
        ("ext_loader_type", C.c_uint8),
        ("cmd_line_ptr", C.c_uint32),
        ("initrd_addr_max", C.c_uint32),
        ("kernel_alignment", C.c_uint32),
        ("relocatable_kernel", C.c_uint8),
        ("min_alignment", C.c_uint8),
        ("xloadflags", C.c_uint16),
        ("cmdline_size", C.c_uint32),
        ("hardware_subarch", C.c_uint32),
        ("hardware_subarch_data", C.c_uint64),
        ("payload_offset", C.c_uint32),
        ("payload_length", C.c_uint32),
        ("setup_data", C.c_uint64),
        ("pref_address", C.c_uint64),
        ("init_size", C.c_uint32),
        ("handover_offset", C.c_uint32),
        ("kernel_info_offset", C.c_uint32),
    ]


class boot_e820_entry(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", C.c_uint64), ("size", C.c_uint64), ("type", C.c_uint32)]


E820_MAX_ENTRIES_ZEROPAGE = 128
SETUP_HEADER_OFFSET = 0x1F1


class boot_params(C.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("_pad0", C.c_uint8 * 0x70),
        ("acpi_rsdp_addr", C.c_uint64),           # 0x070
        ("_pad1", C.c_uint8 * (0xC0 - 0x78)),
        ("ext_ramdisk_image", C.c_uint32),        # 0x0c0
        ("ext_ramdisk_size", C.c_uint32),         # 0x0c4
        ("ext_cmd_line_ptr", C.c_uint32),         # 0x0c8
        ("_pad2", C.c_uint8 * (0x1E8 - 0xCC)),
        ("e820_entries", C.c_uint8),              # 0x1e8
        ("_pad3", C.c_uint8 * (SETUP_HEADER_OFFSET - 0x1E9)),
        ("hdr", setup_header),                    # 0x1f1
        ("_pad4", C.c_uint8 * (0x2D0 - SETUP_HEADER_OFFSET - C.sizeof(setup_header))),
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad5", C.c_uint8 * (0x1000 - 0x2D0 - 20 * E820_MAX_ENTRIES_ZEROPAGE)),
    ]


BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
LOADER_TYPE_UNDEFINED = 0xFF
LOADFLAGS_LOADED_HIGH = 0x01
LOADFLAGS_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
KERNEL_ALIGNMENT = 0x100_0000
