"""Test harness for vdsmlite: real daemons, loop-device LUNs, sanlock daemons.

Nothing here is imported by the daemon; it builds the world the tests (and
benchmarks) run the daemon in, on machines without a SAN, a udev daemon or a
hardware watchdog.
"""
