"""Fake /proc, /sys and /dev trees, a fake NVML library and tiny model builders for the probe tests."""
