"""pycrosvm: crosvm, the ChromeOS virtual machine monitor, in Python."""

__version__ = "0.1.0"
