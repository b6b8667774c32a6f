"""rfloc-serve: radio transmitter localization from receiver-network IQ captures."""

__version__ = "0.1.0"
