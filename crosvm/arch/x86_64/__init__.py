"""x86_64: memory layout, boot protocol, vCPU setup, MP and ACPI tables."""
