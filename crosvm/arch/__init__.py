"""Architecture support (crosvm's `arch`, `x86_64` and `acpi_tables` crates)."""
