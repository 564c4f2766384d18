"""Storage: devices, connections, LVM, domains and volumes (all blocking code).

Modules here are synchronous unless their names say otherwise; verb handlers
run them in the daemon's bounded executor so the event loop never blocks.
"""
