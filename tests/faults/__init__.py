"""Fault-injection tests: real signals, kills, strace-injected errors, full disks."""
